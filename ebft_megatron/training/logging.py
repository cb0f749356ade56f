"""Metrics out: a console progress line with ETA, tensorboard, wandb (offline unless asked), and a
metrics.jsonl next to the checkpoints. Rank 0 only; other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

CONSOLE_KEYS = [("loss", "loss"), ("loss/ce", "ce"), ("loss/rl", "rl"), ("reward/alignment", "align"),
                ("reward/diversity", "div"), ("cfm", "cfm"), ("reward/verifiable", "reward"),
                ("grad_norm", "|g|"), ("lr", "lr")]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class MetricsLogger:
    def __init__(self, save_dir: Optional[str], total_steps: int, enabled: bool, tensorboard: bool = True,
                 wandb_mode: str = "disabled", wandb_project: str = "ebft_megatron", config: Optional[dict] = None,
                 stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self._stream = stream  # None: whatever sys.stdout is when a line is written
        self._start: Optional[float] = None
        self._start_step = 0
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        if save_dir:
            folder = Path(save_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(folder / "metrics.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(folder / "tensorboard"))
                except Exception as err:  # tensorboard missing or broken: say so, keep training
                    self.note(f"warning: tensorboard logging disabled ({err})")
        if wandb_mode == "offline" and not save_dir:
            wandb_mode = "disabled"  # offline runs live under train.save; without it they would litter the cwd
        if wandb_mode != "disabled":
            try:
                import tempfile

                import wandb

                folder = str(save_dir) if save_dir else tempfile.mkdtemp(prefix="ebft_wandb_")
                self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, config=config, dir=folder,
                                         reinit=True)
            except Exception as err:
                self.note(f"warning: wandb logging disabled ({err})")

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @property
    def stream(self):
        return self._stream or sys.stdout

    def start(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if console:
            self.note(self.progress_line(step, metrics))

    def progress_line(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        for key, label in CONSOLE_KEYS:
            if key in metrics:
                value = metrics[key]
                parts.append(f"{label} {value:.3g}" if key != "lr" else f"{label} {value:.2e}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        phases = [(key[len("time/"):-len("_s")], value) for key, value in metrics.items()
                  if key.startswith("time/") and key.endswith("_s")]
        if phases:
            parts.append(" ".join(f"{name} {value:.1f}s" for name, value in phases))
        if self._start is not None and step > self._start_step:
            per_step = (time.perf_counter() - self._start) / (step - self._start_step)
            parts.append(f"{per_step:.1f} s/step")
            parts.append(f"ETA {format_seconds(per_step * (self.total_steps - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
