"""Stall detection: a process whose training makes no progress for ``train.timeout_minutes``
says which rank and which phase it was in, and exits, so that torchrun's restarts can act.

A rank that stops (a wedged data reader, a stuck sandbox, a lost node) leaves every other rank
waiting in a collective. The collectives time out too (the same setting, on every process
group), but their error names no rank and no phase; the watchdog fires first and does.

Progress is a beat: every phase of a step (``runtime.timing.PhaseTimer``), the checkpoint, each
evaluation chunk. Where torch.distributed has a key-value store (torchrun's), each rank's watchdog
also writes there, every few seconds, the time and its step and phase: the rank that reports a
stall names the ranks that stopped writing (a stopped or lost process), or else the ranks with the
fewest beats (a live process stuck in one phase).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

STALL_EXIT_CODE = 3  # what a stalled process exits with (torchrun restarts on any non-zero code)

_current: Optional["Watchdog"] = None


def progress(phase: Optional[str] = None) -> None:
    """Note progress (in ``phase``, or the current one) to the running watchdog, if any."""
    if _current is not None:
        _current.beat(phase)


def close() -> None:
    """Stop the running watchdog, if any (the run ended, or is ending with an error)."""
    if _current is not None:
        _current.close()


class Watchdog:
    """Ends the process when no beat came for ``timeout_s`` seconds."""

    def __init__(self, timeout_s: float, rank: int = 0, store=None, poll_s: Optional[float] = None,
                 on_stall: Optional[Callable[[str], None]] = None):
        self.timeout_s, self.rank, self.store = timeout_s, rank, store
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(timeout_s / 20, 0.05))
        self.on_stall = on_stall or _exit_stalled
        self.phase, self.step, self.beats = "setup", 0, 0
        self._last = time.monotonic()
        self._published = 0.0  # when this rank's stamp last went to the store (monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ebft-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        global _current
        _current = self
        self.beat("setup")
        self._thread.start()
        return self

    def close(self) -> None:
        global _current
        self._stop.set()
        if _current is self:
            _current = None

    def beat(self, phase: Optional[str] = None, step: Optional[int] = None) -> None:
        self.phase = phase or self.phase
        self.step = self.step if step is None else step
        self.beats += 1
        self._last = time.monotonic()
        # also from the working thread: the stamp others read must not depend on the watch thread
        # being scheduled (on a loaded machine it can miss whole seconds)
        if self._last - self._published >= self.poll_s:
            self._publish()

    def stall_message(self, waited_s: float) -> str:
        message = (f"rank {self.rank}: no progress for {waited_s:.0f} s (train.timeout_minutes) at step "
                   f"{self.step}, phase {self.phase}")
        behind = self._ranks_behind()
        if behind:
            message += "; " + behind
        return message + "; exiting so that the job can restart from its last checkpoint"

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"ebft_watchdog/{self.rank}", f"{time.time():.3f} {self.beats} {self.step} {self.phase}")
            self._published = time.monotonic()
        except Exception:  # the store only serves the stall message; training goes on without it
            self.store = None

    def _ranks_behind(self) -> str:
        """The ranks that stopped writing to the store (else those with the fewest beats), with
        the step and phase they were last seen in."""
        if self.store is None:
            return ""
        import torch.distributed as dist

        seen = {}
        for attempt in range(3):  # a loaded machine can make one read of the store fail: try again
            try:
                for rank in range(dist.get_world_size()):
                    key = f"ebft_watchdog/{rank}"
                    if rank != self.rank and rank not in seen and self.store.check([key]):
                        stamp, beats, step, phase = self.store.get(key).decode().split(" ", 3)
                        seen[rank] = (time.time() - float(stamp), int(beats), step, phase)
                break
            except Exception:
                time.sleep(0.2)
        if not seen:
            return ""
        silent = {rank: s for rank, s in seen.items() if s[0] > 3 * self.poll_s + 1.0}
        if silent:
            return ", ".join(f"rank {rank} not responding for {age:.0f} s (last at step {step}, phase {phase})"
                             for rank, (age, _, step, phase) in sorted(silent.items()))
        fewest = min([self.beats] + [s[1] for s in seen.values()])
        behind = {rank: s for rank, s in seen.items() if s[1] == fewest and fewest < self.beats}
        return ", ".join(f"rank {rank} is behind at step {step}, phase {phase}"
                         for rank, (_, _, step, phase) in sorted(behind.items()))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._publish()
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                self.on_stall(self.stall_message(waited))
                return


def _exit_stalled(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(STALL_EXIT_CODE)  # the main thread is stuck in a collective: only a hard exit ends it


def default_store():
    """torch.distributed's key-value store (torchrun's rendezvous store), or None."""
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            return dist.distributed_c10d._get_default_store()
    except Exception:
        pass
    return None
