"""How a worker child's idle OpenMP threads wait: set in the environment before torch loads OpenMP.

A GPU child's CPU work is decoding in its own threads: its OpenMP threads wait passively. A CPU
child shares its cores with the web tier, Redis and decoding. With libgomp's default spin (300,000
turns before an idle thread sleeps) a parallel region waits at each barrier for the thread the
scheduler took away, and a forward pass took 3-7x as long whenever another process ran; 10,000
turns keep a quiet box's speed (passive waits made a single image 2x slower there) and most of
passive's gain under load (BENCHMARKS.md, "OpenMP threads that spin"). An operator's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins. libgomp is the OpenMP of torch's Linux wheels; another
runtime ignores ``GOMP_SPINCOUNT``.
"""
from __future__ import annotations

import os

CPU_CHILD_SPINCOUNT = 10_000


def limit_spinning(gpu: bool, environ=os.environ) -> None:
    """Set how this child's OpenMP threads wait, in ``environ`` (the process's); call it before torch
    is imported."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    if gpu:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        environ["GOMP_SPINCOUNT"] = str(CPU_CHILD_SPINCOUNT)


def waits(environ=os.environ) -> str:
    """How this child's idle OpenMP threads wait, as ``environ`` says (the heartbeat shows it)."""
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"].lower()
    return f"spin {environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in environ else "default"
