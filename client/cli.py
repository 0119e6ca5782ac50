"""``imgsvc``: classify image files and folders with an imgsvc server, one JSON line per file.

    imgsvc submit PATH... [--url URL] [--api-key KEY] [--model M] [--top-k N] [--no-gradcam]
                          [--callback-url URL] [--deadline S] [--concurrency 4] [--timeout 300]
                          [--output results.jsonl] [--heatmaps DIR] [--quiet]
    imgsvc batch PATH...  (the same options; one request per --batch-size images)
    imgsvc get JOB_ID [--wait S]
    imgsvc cancel JOB_ID

Each line is ``{"file": path, "job": <job JSON>}``, or ``{"file": path, "error": {"code", "message"},
"status": <HTTP status or null>}`` for an upload that was refused. Exit status: 0 when every job is
done, 1 when any failed or was refused, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from client.http import ApiClient, ApiError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """The command line cannot be acted on (exit status 2)."""


def find_images(paths: list[str]) -> list[Path]:
    """Expand folders (recursively, image suffixes only, any case); keep named files as given."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    if not found:
        raise UsageError("no image files found in " + ", ".join(paths))
    return found


class Results:
    """Writes one JSON line per file (thread-safe), saves heatmaps, and remembers whether all went well."""

    def __init__(self, out, heatmaps: Path | None):
        self.out, self.heatmaps = out, heatmaps
        self.all_done = True
        self._lock = threading.Lock()
        self._heatmap_names: set[str] = set()

    def job(self, path: Path, job: dict, heatmap: bytes | None = None, error: ApiError | None = None) -> None:
        line = {"file": str(path), "job": job}
        if heatmap is not None:
            line["heatmap"] = str(self._save_heatmap(path, heatmap))
        if error is not None:
            line["error"] = error.to_dict()
        self._write(line, ok=job["status"] == "done" and error is None)

    def refused(self, path: Path, error: ApiError) -> None:
        self._write({"file": str(path), "error": error.to_dict(), "status": error.status}, ok=False)

    def _save_heatmap(self, path: Path, png: bytes) -> Path:
        with self._lock:  # unique names: photos in different folders may share a stem
            name, n = f"{path.stem}.png", 1
            while name in self._heatmap_names:
                n += 1
                name = f"{path.stem}-{n}.png"
            self._heatmap_names.add(name)
        target = self.heatmaps / name
        target.write_bytes(png)
        return target

    def _write(self, line: dict, ok: bool) -> None:
        with self._lock:
            self.all_done = self.all_done and ok
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()


def classify(client: ApiClient, path: Path, options: dict, args, results: Results) -> bool:
    """Submit one file, wait for its job, save its heatmap; record the outcome. Return True if done."""
    try:  # the server holds the answer until the job settles (Prefer: wait): usually one request per file
        job = client.submit(path.read_bytes(), path.name, options, wait_s=max(1, int(args.timeout)))
    except ApiError as exc:
        results.refused(path, exc)
        return False
    except OSError as exc:
        results.refused(path, ApiError(None, "unreadable_file", str(exc)))
        return False
    try:
        job = client.wait_job(job, args.timeout)
        if job["status"] not in ("done", "failed", "canceled"):
            raise ApiError(None, "client_timeout", f"still {job['status']} after {args.timeout} s")
        heatmap = client.heatmap(job) if args.heatmaps and job["status"] == "done" else None
    except ApiError as exc:
        results.job(path, job, error=exc)
        return False
    results.job(path, job, heatmap)
    return job["status"] == "done"


def job_options(args) -> dict:
    return {"model": args.model, "top_k": args.top_k, "gradcam": "false" if args.no_gradcam else None,
            "callback_url": args.callback_url, "deadline_s": args.deadline}


def progress_bar(args, total: int) -> tqdm:
    """A progress bar on stderr, shown only on a terminal and without --quiet."""
    return tqdm(total=total, unit="image", file=sys.stderr, disable=args.quiet or not sys.stderr.isatty())


def run_submit(args, client: ApiClient, results: Results, files: list[Path]) -> None:
    options = job_options(args)
    with progress_bar(args, len(files)) as bar, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(classify, client, path, options, args, results) for path in files]
        for future in as_completed(futures):
            future.result()
            bar.update(1)


def run_batch(args, client: ApiClient, results: Results, files: list[Path]) -> None:
    """Send the files in batches of --batch-size; a refused batch refuses every file in it."""
    options = job_options(args)
    with progress_bar(args, len(files)) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            try:
                batch = client.submit_batch([(p.name, p.read_bytes()) for p in chunk], options)
                batch = client.wait_batch(batch, args.timeout)
            except ApiError as exc:
                for path in chunk:
                    results.refused(path, exc)
            else:
                for path, job in zip(chunk, batch["jobs"]):
                    heatmap = client.heatmap(job) if args.heatmaps and job["status"] == "done" else None
                    results.job(path, job, heatmap)
            bar.update(len(chunk))


def run_get(args, client: ApiClient) -> int:
    """``get`` and ``cancel``: print the job (canceled, for ``cancel``)."""
    try:
        job = client.cancel(args.job_id) if args.command == "cancel" else client.job(args.job_id, wait_s=args.wait)
    except ApiError as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(job, indent=2))
    return EXIT_OK


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("IMGSVC_URL", "http://127.0.0.1:8000"),
                        help="server base URL (env IMGSVC_URL; default %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("IMGSVC_API_KEY"),
                        help="API key, sent as a bearer token (env IMGSVC_API_KEY)")
    parser = argparse.ArgumentParser(prog="imgsvc", description="Classify images with an imgsvc server.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("submit", "submit each image as its own job"),
                            ("batch", "submit the images as batches")):
        sub = commands.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("paths", nargs="+", metavar="PATH",
                         help="image files or folders (searched recursively)")
        sub.add_argument("--model", help="model name (default: the server's default)")
        sub.add_argument("--top-k", type=int, choices=range(1, 21), metavar="N",
                         help="labels per image (1-20)")
        sub.add_argument("--no-gradcam", action="store_true", help="skip the GradCAM heatmap")
        sub.add_argument("--callback-url",
                         help="URL the server POSTs a signed webhook to when each job settles")
        sub.add_argument("--deadline", type=float, metavar="S",
                         help="seconds each job may wait for a worker; past it, it fails deadline_exceeded")
        sub.add_argument("--timeout", type=float, default=300, help="seconds to wait for each job or batch")
        sub.add_argument("--output", "-o", help="write JSON lines here instead of stdout")
        sub.add_argument("--heatmaps", type=Path, metavar="DIR", help="save each GradCAM PNG in DIR")
        sub.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        if name == "submit":
            sub.add_argument("--concurrency", type=positive_int, default=4, help="images in flight at once")
        else:
            sub.add_argument("--batch-size", type=positive_int, default=64, help="images per batch request")
    get = commands.add_parser("get", parents=[common], help="print one job's JSON")
    get.add_argument("job_id")
    get.add_argument("--wait", type=float, default=0, help="long-poll up to this many seconds (max 30)")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job; print it")
    cancel.add_argument("job_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    client = ApiClient(args.url, args.api_key)
    if args.command in ("get", "cancel"):
        return run_get(args, client)
    try:
        files = find_images(args.paths)
        if args.heatmaps:
            args.heatmaps.mkdir(parents=True, exist_ok=True)
        out = open(args.output, "w") if args.output else sys.stdout
    except (UsageError, OSError) as exc:
        parser.error(str(exc))
    results = Results(out, args.heatmaps)
    try:
        (run_submit if args.command == "submit" else run_batch)(args, client, results, files)
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK if results.all_done else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
