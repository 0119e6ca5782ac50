"""CPU time per process kind, read from /proc: the cost per image that wall-clock times hide."""
from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; the name may hold spaces


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_cpu_s(pid: int, tree: dict[int, list[int]] | None = None) -> float:
    """CPU seconds (user + system) of ``pid``, its live descendants and the children it reaped."""
    tree = _children() if tree is None else tree
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of /proc/<pid>/stat (index 11-14 here)
    own = sum(int(v) for v in fields[11:15]) / TICKS
    return own + sum(tree_cpu_s(child, tree) for child in tree.get(pid, []))


class CpuMeter:
    """Snapshot the CPU time of named process trees (and this process) before and after a run."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        tree = _children()
        times = {name: tree_cpu_s(pid, tree) for name, pid in self.pids.items()}
        usage = os.times()
        times["load generator"] = usage.user + usage.system
        return times

    def per_image_ms(self, images: int) -> dict[str, float]:
        """Return CPU milliseconds per image for each kind since construction, and their total."""
        end = self._read()
        table = {name: (end[name] - self.start[name]) * 1000 / images for name in end}
        table["total"] = sum(table.values())
        return table
