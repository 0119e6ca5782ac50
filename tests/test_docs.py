"""README.md and docs/*.md: every relative link points at a file that exists, every #anchor at a heading,
every test a page names exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.settings import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "BENCHMARKS.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings count."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page, duplicates numbered the way GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_fits_the_first_five_minutes():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for must in ("make run", "make test", "curl", "docs/api.md"):
        assert must in readme


def test_every_docs_page_is_linked_from_the_readme():
    links = {target.partition("#")[0] for target in relative_links(REPO_ROOT / "README.md")}
    pages = {f"docs/{page.name}" for page in (REPO_ROOT / "docs").glob("*.md") if page.name != "README.md"}
    assert pages <= links, pages - links


def test_the_slug_rules_match_github():
    assert github_slug("Integrators: keys, webhooks, batches") == "integrators-keys-webhooks-batches"
    assert github_slug("Deviations from DESIGN.md (on purpose)") == "deviations-from-designmd-on-purpose"
    assert github_slug("`make run` & friends") == "make-run--friends"


TEST_REFERENCE = re.compile(r"(tests/\w+\.py)(?:::(\w+))?")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_test_a_page_names_exists(page):
    """A guarantee is only as good as the test it names: a renamed or removed test must fail here."""
    missing = []
    for path, name in TEST_REFERENCE.findall(page.read_text()):
        source = REPO_ROOT / path
        if not source.exists() or (name and not re.search(rf"^\s*(async )?def {name}\(", source.read_text(), re.M)):
            missing.append(f"{path}::{name}" if name else path)
    assert not missing, f"{page.name} names tests that do not exist: {missing}"
