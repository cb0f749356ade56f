"""The training loop, readable top to bottom: setup, then for each step
chunks -> experience (rollouts, features, rewards) -> forward/backward -> optimizer step,
with evaluation, checkpoints and logging around it."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from ebft_megatron import evaluation
from ebft_megatron.config import Config, layout_of
from ebft_megatron.data.dataset import ChunkLoader, micro_batches
from ebft_megatron.errors import UserError
from ebft_megatron.evaluation.files import atomic_write
from ebft_megatron.evaluation.report import changes
from ebft_megatron.evaluation.statistics import NOISE_STANDARD_ERRORS
from ebft_megatron.models import flops
from ebft_megatron.objective.objectives import Batch, ObjectiveContext, build_objective
from ebft_megatron.rollouts.sampler import rollout_generator
from ebft_megatron.runtime import device, distributed
from ebft_megatron.runtime.timing import PhaseTimer
from ebft_megatron.runtime.watchdog import Watchdog, default_store
from ebft_megatron.training import builder
from ebft_megatron.training.checkpointing import (latest_good_checkpoint, load_training_checkpoint,
                                                  save_training_checkpoint)
from ebft_megatron.training.logging import MetricsLogger
from ebft_megatron.training.optimizer import finish_step, prepare_step
from ebft_megatron.training.step import loss_terms, read_figures, term_names


class TrainingAborted(UserError, RuntimeError):
    """Too many consecutive non-finite steps."""


class Trainer:
    def __init__(self, config: Config, log=None):
        self.config = c = config
        self.info = builder.initialize(c)
        self.watchdog = Watchdog(60 * c.train.timeout_minutes, self.info.rank, default_store()).start()
        self.is_rank0 = distributed.is_rank0()
        self.logger = MetricsLogger(c.train.save or None, c.train.steps, enabled=self.is_rank0,
                                    tensorboard=c.train.tensorboard, wandb_mode=c.train.wandb,
                                    wandb_project=c.train.wandb_project, config=c.to_dict())
        self.log = log or self.logger.note
        self.layout = layout_of(c)
        self.source = Path(c.model.load)
        self.arch = builder.architecture(c)
        c.train.check_data_parallel(self.info.dp_size)

        # data
        tokenizer = builder.tokenizer(c, self.arch)
        self.train_chunks = builder.chunks(c, tokenizer, "train", verbose=self.is_rank0)
        self.val_chunks = builder.chunks(c, tokenizer, "validation", verbose=self.is_rank0)
        self.loader = ChunkLoader(len(self.train_chunks.tokens), c.train.chunks_per_step, self.info.dp_rank,
                                  self.info.dp_size, c.train.seed)
        self.log(f"data: {len(self.train_chunks.tokens)} training chunks, {len(self.val_chunks.tokens)} validation "
                 f"chunks of {c.rollout.chunk_len} tokens; {self.loader.steps_per_epoch} steps per epoch")

        # models
        self.policy = builder.policy(c, self.arch)
        self.ddp, self.optimizer = builder.optimizer(c, self.policy)
        self.scheduler = builder.scheduler(c, self.optimizer)
        self.feature_model = builder.feature_network(c, self.policy)
        self.generator = rollout_generator(c.train.seed, self.info.dp_rank)
        self.timer = PhaseTimer()
        self.objective = build_objective(c, ObjectiveContext(self.layout, self.arch.vocab_size, self.generator,
                                                             self.feature_model, tokenizer, self.timer))

        self._first_evaluation = self._last_evaluation = None
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        if c.train.save and c.train.resume:
            self._resume()

    # --- setup pieces -------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = latest_good_checkpoint(self.config.train.save, log=self.log)
        if ckpt is None:
            return
        state = load_training_checkpoint(ckpt, self.policy, self.optimizer, self.generator)
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state.get("skipped_steps", 0)
        self.log(f"resumed from {ckpt} at step {self.step}")

    # --- one step -----------------------------------------------------------------------------
    def _micro_batches(self, indices: list[int]):
        chunks = self.train_chunks
        for group in micro_batches(indices, self.config.train.micro_batch):
            picked = torch.as_tensor(group, dtype=torch.long)
            doc_ids = chunks.doc_ids[picked] if self.config.data.document_masking else None
            # the one boundary a training batch crosses from the host to the run's device
            yield device.to_device(Batch(chunks.tokens[picked], chunks.lengths[picked], doc_ids))

    def train_step(self) -> dict:
        c = self.config
        started = time.perf_counter()
        self.watchdog.beat("data", step=self.step + 1)
        indices = self.loader.next_indices()
        experiences = self.objective.experiences(list(self._micro_batches(indices)), self.ddp)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self.timer.phase("forward_backward"):
            terms = loss_terms(self.ddp, experiences, self.objective)
        with self.timer.phase("optimizer"):
            squared_grad_norm = prepare_step(self.optimizer)
            # the step's one wait on the device: every figure, and whether to take the step
            metrics = read_figures(term_names(self.objective, self.ddp), terms, [e.metrics for e in experiences],
                                   squared_grad_norm)
            finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
            if finite:
                finish_step(self.optimizer, metrics["grad_norm"])
        if finite:
            self.scheduler.step(1)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            self.log(f"warning: step {self.step + 1}: non-finite loss or gradient, step skipped "
                     f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in total)")
            if self.nonfinite_in_a_row >= c.train.max_nonfinite_steps:
                raise TrainingAborted(
                    f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient "
                    f"(limit train.max_nonfinite_steps={c.train.max_nonfinite_steps}); stopping. Lower optimizer.lr, "
                    "check the data, or resume from the last checkpoint")
        self.step += 1
        device.synchronize()  # the step's time includes its queued kernels
        elapsed = time.perf_counter() - started
        chunks = c.train.chunks_per_step
        metrics.update({"lr": self.optimizer.param_groups[0]["lr"], "step_time_s": elapsed,
                        "skipped_steps": self.skipped_steps, "tokens_per_s": chunks * c.rollout.chunk_len / elapsed})
        metrics.update({f"time/{phase}_s": seconds for phase, seconds in self.timer.take().items()})
        if torch.cuda.is_available():  # MFU: model FLOPs of the step over what the GPUs could do
            import torch.distributed as dist

            per_chunk = self.objective.flops_per_chunk(flops.CostModel.of(self.arch))
            metrics["mfu"] = chunks * per_chunk / elapsed / (dist.get_world_size() * c.train.peak_tflops * 1e12)
        return metrics

    # --- evaluation and saving ----------------------------------------------------------------
    def evaluate(self, tag: str) -> dict:
        """Validation CE and the feature-matching curve (CFM vs completion length); the report
        (CSV, PNG, metrics.json, with the first evaluation overlaid) goes to <save>/eval/<tag>."""
        c = self.config
        self.watchdog.beat("evaluation")
        result = evaluation.evaluate_run(c, self.ddp, self.feature_model, self.val_chunks, self.arch.vocab_size,
                                         self.info.dp_rank)
        if c.train.save:
            evaluation.write_report(Path(c.train.save) / "eval" / tag, result.ce, result.curve,
                                    before=self._first_evaluation)
        if self._first_evaluation is None:
            self._first_evaluation = result
        self._last_evaluation = result
        return result.metrics()

    def change_since_first_evaluation(self) -> str:
        """One line: the held-out CFM's and CE's changes since the first evaluation, each with its
        standard error (paired over the same blocks or chunks), and whether each is beyond noise
        (more than 2 standard errors); also written to <save>/eval/change.json."""
        found = changes(self._first_evaluation, self._last_evaluation)
        units = {"cfm": "blocks", "ce": "chunks"}
        line = "eval change: " + "; ".join(
            f"{change.text(name.upper(), units[name])}: {'beyond' if change.beyond() else 'within'} noise"
            for name, change in found.items()) + f" (noise: {NOISE_STANDARD_ERRORS:g} standard errors)"
        if self.config.train.save and distributed.is_rank0():
            report = {name: {**vars(change), "beyond_2_standard_errors": change.beyond()}
                      for name, change in found.items()}
            atomic_write(Path(self.config.train.save) / "eval" / "change.json",
                         (json.dumps(report, indent=1) + "\n").encode())
        return line

    def save(self) -> Optional[Path]:
        if not self.config.train.save:
            return None
        self.watchdog.beat("checkpoint")
        state = {"loader": self.loader.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "skipped_steps": self.skipped_steps, "seed": self.config.train.seed,
                 "config": self.config.to_dict()}
        path = save_training_checkpoint(self.config.train.save, self.step, self.policy, self.optimizer, self.arch,
                                        self.source, state, self.generator, self.config.train.keep_last)
        self.log(f"saved {path}")
        return path

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        history = {"losses": []}
        if c.eval.before_and_after and (self.step == 0 or c.eval.interval):
            before = self.evaluate(f"step_{self.step:06d}")
            self.logger.log(self.step, before, console=False)
            self.log("eval before: " + json.dumps({k: round(v, 4) for k, v in before.items()}))
            history["eval_before"] = before
        self.logger.start(self.step)
        while self.step < c.train.steps:
            metrics = self.train_step()
            history["losses"].append(metrics["loss"])
            self.logger.log(self.step, metrics, console=self.step % c.train.log_interval == 0)
            if c.train.save_interval and self.step % c.train.save_interval == 0 and self.step < c.train.steps:
                self.save()
            if c.eval.interval and self.step % c.eval.interval == 0 and self.step < c.train.steps:
                self.logger.log(self.step, self.evaluate(f"step_{self.step:06d}"), console=False)
        if c.eval.before_and_after:
            after = self.evaluate(f"step_{self.step:06d}")
            self.logger.log(self.step, after, console=False)
            self.log("eval after: " + json.dumps({k: round(v, 4) for k, v in after.items()}))
            if self._first_evaluation is not self._last_evaluation:
                self.log(self.change_since_first_evaluation())
            history["eval_after"] = after
        self.save()
        self.logger.close()
        self.watchdog.close()
        return history
