"""One decision for every process of a multi-process job, and Ctrl-C taken by all of them at once.

A process that stops alone on Ctrl-C leaves the others waiting in their next collective, and itself
waiting for them in JAX's shutdown barrier: the job hangs until someone kills it. Inside
`agreed_interrupts()` a first Ctrl-C is only a request, which `check` (called by every process at the
same points, e.g. between generation batches) turns into a KeyboardInterrupt on every process at once,
outside any collective. A second Ctrl-C interrupts at once. One process keeps Python's own Ctrl-C.
(The trainer has its own: a Ctrl-C there is a preemption notice, `train.trainer.StopRequests`.)
"""
from __future__ import annotations

import contextlib
import signal

import jax
import numpy as np

_requested = False


def agreed(flag: bool, decide=all) -> bool:
    """One decision for all processes from each one's own `flag` (an all-gather, so every process
    must call it at the same point; one process decides alone)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(decide(np.asarray(multihost_utils.process_allgather(np.int32(flag)))))


def _request(*unused) -> None:
    global _requested
    _requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def agreed_interrupts():
    """Within: in a multi-process job, a first Ctrl-C waits for every process's next `check`."""
    global _requested
    if jax.process_count() == 1:
        yield
        return
    _requested = False
    previous = signal.signal(signal.SIGINT, _request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """KeyboardInterrupt on every process if Ctrl-C reached any of them (inside `agreed_interrupts`).
    Every process of a multi-process job calls it at the same points."""
    if jax.process_count() > 1 and agreed(_requested, decide=any):
        raise KeyboardInterrupt
