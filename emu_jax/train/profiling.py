"""A profiler trace of a window of training steps (`config.train.profile`), to see where a step's time
goes on the slice a run is on:

    python -m emu_jax.train --config=... --workdir=DIR --config.train.profile.from_step=10 \\
        --config.train.profile.steps=3

Every process traces its own host and devices into `DIR/profile/process_<i>/` (JAX's
`plugins/profile/<run>/<host>.xplane.pb`, for TensorBoard's profile plugin or xprof; processes of one
host would write the same file name into one directory). Each step of the window is a
`StepTraceAnnotation` ("train", its step number), for the profile plugin's step-time breakdown: the
host taking and placing its batch, dispatching it, and waiting for the step before (which the
devices run meanwhile), or for this one where the loop acts on its results (a log, a checkpoint,
the window's last step). `DIR/profile/process_<i>/memory.prof` holds this process's live device
buffers at the window's end, each with the Python stack that allocated it (pprof: `go tool pprof`).
A run's first step (and a resumed run's) compiles the step function: a window starting there traces
the compilation too. A window whose first step a resumed run has passed is not traced.
"""
from __future__ import annotations

import contextlib
import os

import jax
from absl import logging


class ProfileConfigError(ValueError):
    """`config.train.profile` asks for a window the run cannot trace."""


class ProfileWindow:
    """Starts the trace before step `first`, annotates each step of the window, and writes the trace
    after step `first + count - 1` has finished (or when the loop ends inside the window)."""

    def __init__(self, directory: str, first: int, count: int):
        self.directory, self.first, self.count = directory, first, count
        self.tracing = False

    @classmethod
    def from_config(cls, profile, workdir: str, total_steps: int) -> "ProfileWindow":
        """`profile`: {from_step (0: no trace), steps}; checked before anything starts."""
        first, count = int(profile.from_step), int(profile.steps)
        if first < 0 or (first and count < 1):
            raise ProfileConfigError(f"train.profile.from_step={first}, train.profile.steps={count}: the first "
                                     f"traced step must be >= 1 (0: no trace) and the window at least one step")
        if first > total_steps:
            raise ProfileConfigError(f"train.profile.from_step={first} is past train.steps={total_steps}: nothing "
                                     f"would be traced")
        return cls(os.path.join(workdir, "profile", f"process_{jax.process_index()}"), first, count)

    def resumed_after(self, step: int) -> None:
        """A run resumed after `step`: a window starting at or before it is not traced (said once)."""
        if self.first and self.first <= step:
            logging.warning("train.profile.from_step=%d: this run resumes after step %d, so nothing is traced "
                            "(a later from_step traces this run)", self.first, step)
            self.first = 0

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def begin(self, step: int) -> None:
        """Starts the trace before the window's first step (outside the step's timing)."""
        if self.first and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def annotate(self, step: int):
        """Context for running step `step`: marks the window's steps in the trace."""
        if not self.tracing:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def ends_at(self, step: int) -> bool:
        """Whether the trace is written after step `step`."""
        return self.tracing and step == self.last

    def after(self, step: int, outputs) -> None:
        """After step `step`: at the window's last step, waits for its `outputs` and writes the trace."""
        if self.ends_at(step):
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """Writes the trace if one is open (the loop ended inside the window: an error, a stop, the
        run's last step)."""
        if not self.tracing:
            return
        self.tracing = False
        try:
            jax.profiler.stop_trace()
            jax.profiler.save_device_memory_profile(os.path.join(self.directory, "memory.prof"))
        except (OSError, RuntimeError) as e:  # a diagnostic that cannot be written must not end the run
            logging.warning("train.profile: the trace of steps %d-%d was not written to %s: %s", self.first,
                            self.last, self.directory, e)
