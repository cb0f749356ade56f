"""A tiny training setup shared by the trainer tests and the multi-process launches."""

from __future__ import annotations

from pathlib import Path

CODE_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n    def pop(self):\n        return self.items.pop()\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\n\ndef size(path):\n    return os.path.getsize(path)\n",
]


def make_code_folder(folder: Path, files: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "\n".join(CODE_SNIPPETS[(i + k) % len(CODE_SNIPPETS)] for k in range(3 + i % 4))
        (folder / f"module_{i:02d}.py").write_text(body)
    return folder


def tiny_overrides(checkpoint: Path, code: Path, save: Path, steps: int = 4, mode: str = "ebft", **extra) -> list[str]:
    settings = {
        "model.load": checkpoint, "data.path": code, "data.validation_fraction": 0.25,
        "rollout.chunk_len": 32, "rollout.first_anchor": 4, "rollout.stride": 4, "rollout.rollout_len": 4,
        "rollout.num_samples": 3, "train.steps": steps, "train.chunks_per_step": 2, "train.save": save,
        "train.save_interval": 2, "train.keep_last": 0, "train.wandb": "disabled", "optimizer.lr": 1e-3,
        "optimizer.warmup_fraction": 0, "objective.mode": mode, "eval.ce_chunks": 4, "eval.cfm_chunks": 1,
        "model.recompute": "none",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]
