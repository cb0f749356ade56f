"""Wall time by phase of a training step, measured in one place.

The objectives time their phases (rollouts, features, rewards), the trainer the policy's forward
and backward and the optimizer; the progress line, the metrics files and the benchmarks all read
the same figures. Entering a phase is also progress for the stall watchdog
(``runtime.watchdog``), which names the phase a stalled rank was in, and, while a launch counter
counts (``runtime.launch_count``), the phase its counts go to.

On a GPU a phase is timed by CUDA events recorded on the stream at its ends, read when the
figures are taken (after the trainer has waited for the step's kernels): the time the device
spent from the phase's first kernel to its last, without making the host wait at every phase's
end. On the host, the clock.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ebft_megatron.runtime import device, launch_count, watchdog


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._events: list[tuple] = []  # (phase, start event, end event) on a GPU, read by take()

    @contextmanager
    def phase(self, name: str):
        watchdog.progress(name)
        on_gpu = device.real_cuda()
        started = self._event() if on_gpu else time.perf_counter()
        with launch_count.phase(name):
            try:
                yield
            finally:
                if on_gpu:
                    self._events.append((name, started, self._event()))
                else:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take(self) -> dict[str, float]:
        """The seconds by phase since the last take, and start afresh (on a GPU this waits for
        the last phase's kernels, which the trainer has waited for already)."""
        if self._events:
            self._events[-1][2].synchronize()
        for name, start, end in self._events:
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
        seconds, self.seconds, self._events = self.seconds, {}, []
        return seconds
