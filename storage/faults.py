"""Named fault-injection points: where a test may kill this process to prove recovery.

`point("shard.marker")` does nothing unless the environment holds
``KDCACHE_FAULT=NAME[:NTH[:SIGNAL]]`` with that NAME: then the NTH time (default 1) this process
reaches the point it sends itself SIGNAL (default KILL; TERM, INT, ...). The variable is read at
each call, not at import, so a forked child or a test that sets it late still sees it; a point
sits at a batch, shard or file boundary, never inside a per-row loop, so the lookup costs nothing
measurable. tests/faults/ drives every point and docs/RELIABILITY.md lists what each one proves.

`reached` counts every point this process passes, fault or not: what a rerun actually did (the
teacher batches it ran, the shards it committed, the training steps it took) is measured there,
not taken from the run's own report of it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

ENV = "KDCACHE_FAULT"
_hits: dict[str, int] = {}
_lock = threading.Lock()
reached: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, int, signal.Signals]:
    """("shard.marker", 2, SIGKILL) from "shard.marker:2"; "name:1:TERM" picks the signal."""
    name, _, rest = spec.partition(":")
    nth, _, sig = rest.partition(":")
    return name, int(nth or 1), signal.Signals[f"SIG{(sig or 'KILL').upper()}"]


def point(name: str) -> None:
    with _lock:  # the writer thread passes points too
        reached[name] += 1
    spec = os.environ.get(ENV)
    if not spec or not spec.startswith(name):
        return
    target, nth, sig = parse(spec)
    if target != name:
        return
    with _lock:
        _hits[name] = count = _hits.get(name, 0) + 1
    if count != nth:
        return
    os.kill(os.getpid(), sig)
    if sig != signal.SIGKILL:
        # A Python handler (SIGTERM -> Terminated) runs in the main thread between bytecodes:
        # give it the moment it needs, so that the run stops here and not several steps later.
        time.sleep(0.5)
