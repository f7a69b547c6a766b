"""Threads: how many CPUs this process may use, and running tasks a bounded distance ahead.

No Keras or TensorFlow here: predict with ONNX Runtime imports this module, not `data`.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), in CPUs."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        count = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def decode_workers(requested: int) -> int:
    """Threads that decode images beside the model: `requested`, or for 0 (automatic) none on a
    machine of 2 usable CPUs or fewer, else one per usable CPU.

    On 2 cores the model's own threads already use both: decoding threads beside them preempt
    one of them, and every parallel operator then waits for the straggler. Measured on the 300
    full-size samples (bench/predict_workers.py): decoding between batches in the same thread is
    faster there than 1 or 2 decoding threads."""
    if requested:
        return requested
    cpus = usable_cpus()
    return 0 if cpus <= 2 else cpus


def in_background(tasks: Sequence[Callable[[], T]], *, workers: int, lookahead: int | None = None) -> Iterator[T]:
    """Run `tasks` in a thread pool, yielding results in order, at most `lookahead` ahead;
    `workers` 0: one after the other in the calling thread (see `decode_workers`).

    Decoding and resizing release the GIL in Pillow, so threads overlap them with the model,
    which releases it too. Bounded lookahead keeps memory flat however many tasks there are.
    """
    if workers == 0:
        yield from (task() for task in tasks)
        return
    lookahead = lookahead or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="skinclf-load") as pool:
        pending: deque = deque()
        it = iter(tasks)
        for task in it:
            pending.append(pool.submit(task))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            for task in it:
                pending.append(pool.submit(task))
                break
            yield result
