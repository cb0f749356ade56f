"""Wall time by phase of a training step, measured in one place.

The objectives time their phases (rollouts, features, rewards), the trainer the policy's forward
and backward and the optimizer; the progress line, the metrics files and the benchmarks all read
the same figures. Entering a phase is also progress for the stall watchdog
(``runtime.watchdog``), which names the phase a stalled rank was in, and, while a launch counter
counts (``runtime.launch_count``), the phase its counts go to. On a GPU each phase ends by waiting
for its kernels, so a phase's time is its own and not the next one's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ebft_megatron.runtime import device, launch_count, watchdog


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        watchdog.progress(name)
        started = time.perf_counter()
        with launch_count.phase(name):
            try:
                yield
            finally:
                device.synchronize()  # on CUDA the phase's kernels run after the host has left it
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """The seconds by phase since the last take, and start afresh."""
        seconds, self.seconds = self.seconds, {}
        return seconds
