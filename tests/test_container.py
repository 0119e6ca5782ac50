"""The container image holds what every compose service runs: file checks only, no engine.

Each service built from our Dockerfile names an entry module in its command (gunicorn's
``module:app``, celery's ``-A module``, ``python -c`` in a health check). From there the test walks
the imports of our own packages (lazy imports and Celery's ``include`` strings too) and checks every
file reached against the Dockerfile's COPY set, and every third-party module against what
requirements.txt installs. ``make compose-test`` proves the same with a real engine.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.settings import REPO_ROOT, Settings

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
CPU_OVERRIDE = REPO_ROOT / "docker-compose.cpu.yml"
OWN_PACKAGES = frozenset(p.parent.name for p in REPO_ROOT.glob("*/__init__.py"))
MODULE_STRING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclasses.dataclass(frozen=True)
class Image:
    """What the Dockerfile puts in the image: repo path -> image path, the workdir and the default command."""

    copies: dict[str, PurePosixPath]
    workdir: PurePosixPath
    cmd: list[str]

    def holds(self, repo_file: Path) -> bool:
        """Return True when ``repo_file`` lands in the image at workdir/<its repo path>."""
        rel = repo_file.relative_to(REPO_ROOT).as_posix()
        for src, dest in self.copies.items():
            if rel == src or rel.startswith(src.rstrip("/") + "/"):
                return dest / PurePosixPath(rel).relative_to(src) == self.workdir / rel
        return False


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (l.strip() for l in joined.splitlines()) if line]


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.lstrip().startswith("[") else ["/bin/sh", "-c", args]


def parse_image(text: str) -> Image:
    """Follow WORKDIR and COPY (build context only) through the Dockerfile's last stage."""
    copies: dict[str, PurePosixPath] = {}
    workdir, cmd = PurePosixPath("/"), []
    for instruction, args in dockerfile_instructions(text):
        if instruction == "WORKDIR":
            workdir = workdir / args
        elif instruction == "CMD":
            cmd = exec_form(args)
        elif instruction in ("COPY", "ADD"):
            words = exec_form(args) if args.lstrip().startswith("[") else shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue
            *sources, dest = [w for w in words if not w.startswith("--")]
            target = workdir / dest
            for src in sources:
                src = src.removeprefix("./").rstrip("/")
                # A file copied into a directory keeps its name; a directory's contents land in dest.
                file_into_dir = dest.endswith("/") and (REPO_ROOT / src).is_file()
                copies[src] = target / PurePosixPath(src).name if file_into_dir else target
    return Image(copies, workdir, cmd)


def entry_modules(argv: list[str]) -> list[str]:
    """Return the modules a service command imports first; fail on a command the test cannot read."""
    program = PurePosixPath(argv[0]).name
    if program == "gunicorn":
        return [next(a for a in reversed(argv) if re.fullmatch(r"[\w.]+:\w+", a)).split(":")[0]]
    if program == "celery":
        flag = next(i for i, a in enumerate(argv) if a in ("-A", "--app") or a.startswith("--app="))
        value = argv[flag].partition("=")[2] or argv[flag + 1]
        return [value.split(":")[0]]
    if program in ("python", "python3") and argv[1] == "-m":
        return [argv[2]]
    if program in ("python", "python3") and argv[1] == "-c":
        return sorted(imported_names(ast.parse(argv[2])))
    raise AssertionError(f"tests/test_container.py cannot tell what {argv!r} imports: teach entry_modules")


def imported_names(tree: ast.AST, package: str = "") -> set[str]:
    """Every module name ``tree`` imports (lazy ones too), plus own-package module paths in strings."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # kept only if a module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            if node.value.split(".")[0] in OWN_PACKAGES:
                names.add(node.value)  # Celery's include=["worker.tasks"] and the like
    return names


def module_file(name: str) -> Path | None:
    path = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def walk_imports(roots: list[str]) -> tuple[set[Path], set[str]]:
    """Return the own files reached from ``roots`` (with their packages' __init__) and the third-party
    top-level modules they import."""
    files: set[Path] = set()
    third_party: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top not in OWN_PACKAGES:
            if top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is None or path in files:
                continue
            files.add(path)
            package = ".".join(parts[:depth] if path.name == "__init__.py" else parts[:depth - 1])
            todo.extend(imported_names(ast.parse(path.read_text(), str(path)), package))
    return files, third_party


def runtime_distributions() -> set[str]:
    """Canonical names of requirements.txt and everything they require (as installed here)."""
    todo = [Requirement(l.split("#")[0]) for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
            if l.split("#")[0].strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in importlib.metadata.requires(req.name) or ())
    return seen


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def built_services() -> list[str]:
    """Services built from our Dockerfile (the proxy has its own, deploy/nginx)."""
    return [name for name, spec in compose_services().items() if spec.get("build") == "."]


def service_commands(name: str) -> list[list[str]]:
    """The service's command (or the image's CMD) and a health check run in the same image."""
    spec = compose_services()[name]
    command = spec.get("command") or parse_image(DOCKERFILE.read_text()).cmd
    commands = [command if isinstance(command, list) else shlex.split(command)]
    test = (spec.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test[0] == "CMD":
        commands.append(test[1:])
    return commands


def model_card_roots() -> tuple[list[str], set[str]]:
    """Own modules and third-party packages the served model cards name (loaded by name at run time)."""
    own, third_party = [], set()
    for card_path in sorted(Settings().model_cards_dir.glob("*.toml")):
        card = tomllib.loads(card_path.read_text())
        third_party.add(card.get("weights", {}).get("package", "").split(".")[0])
        if card.get("architecture") == "python":
            module = card["variant"].split(":")[0]
            if module.split(".")[0] in OWN_PACKAGES:
                own.append(module)
            else:
                third_party.add(module.split(".")[0])
    return own, third_party - {""}


def test_compose_is_yaml_with_every_service_buildable_or_an_image():
    services = compose_services()
    assert {"redis", "web", "worker", "webhooks"} <= set(services)
    for name, spec in services.items():
        assert "build" in spec or "image" in spec, f"service {name} has neither build nor image"


def test_worker_keeps_its_gpu_reservation():
    devices = compose_services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_worker_metrics_are_open_to_the_network_and_web_metrics_need_a_token_the_user_sets():
    services = compose_services()
    worker = Settings.from_env({k: str(v) for k, v in services["worker"]["environment"].items()
                                if k.startswith("WORKER_METRICS")})
    assert worker.worker_metrics_bind == "0.0.0.0" and "ports" not in services["worker"]  # compose network only
    assert services["web"]["environment"]["METRICS_TOKEN"].startswith("${METRICS_TOKEN:?")  # no default


def test_cpu_override_is_yaml_and_runs_the_worker_on_the_cpu():
    override = yaml.safe_load(CPU_OVERRIDE.read_text())["services"]
    assert override["worker"]["environment"]["WORKER_DEVICES"] == "cpu"
    assert set(override) <= set(compose_services()), "the override names a service compose does not have"


@pytest.mark.parametrize("service", built_services())
def test_service_entry_modules_and_their_imports_are_in_the_image(service):
    image = parse_image(DOCKERFILE.read_text())
    roots = [m for argv in service_commands(service) for m in entry_modules(argv)]
    files, _ = walk_imports(roots)
    assert any(module_file(m) in files for m in roots if m.split(".")[0] in OWN_PACKAGES), roots
    missing = sorted(str(f.relative_to(REPO_ROOT)) for f in files if not image.holds(f))
    assert not missing, f"{service} imports files the Dockerfile does not COPY to {image.workdir}: {missing}"


@pytest.mark.parametrize("service", built_services())
def test_service_third_party_imports_are_installed_by_requirements(service):
    roots = [m for argv in service_commands(service) for m in entry_modules(argv)]
    card_modules, card_packages = model_card_roots()
    _, third_party = walk_imports(roots + card_modules)
    distributions = importlib.metadata.packages_distributions()
    runtime = runtime_distributions()
    if service in ("worker", "flower"):
        third_party |= card_packages
    missing = {}
    for module in sorted(third_party):
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not dists & runtime:
            missing[module] = sorted(dists) or "not installed here"
    assert not missing, f"{service} imports modules requirements.txt does not install: {missing}"


def test_model_cards_directory_is_in_the_image():
    image = parse_image(DOCKERFILE.read_text())
    cards = sorted(Settings().model_cards_dir.glob("*.toml"))
    assert cards and all(image.holds(card) for card in cards)


def test_image_python_is_the_one_pip_installed_into():
    """Services call gunicorn/celery/python by name: the venv the requirements go into is on PATH."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    venv = re.search(r"VIRTUAL_ENV=(\S+)", env).group(1)
    assert re.search(rf"PATH={re.escape(venv)}/bin:", env)
    assert any(instruction == "RUN" and f"venv {venv}" in args for instruction, args in instructions)
