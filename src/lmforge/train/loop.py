"""The one training loop every task uses: the `Trainer`, and `train()`, which builds one and runs it.

A task (`lmforge.train.tasks.Task`) supplies datasets, batches and `loss_and_metrics`; the Trainer
owns everything else: setting a run up (model, data, optimizer, resume), the steps (forward and
backward in `lmforge.train.step`, the update in `lmforge.train.update`), logging, evaluation,
checkpoints, early stopping, non-finite recovery and the end of a run. A checkpoint's training
state is the composition of the state dicts of the run's stateful parts.

The sample order (`epoch_permutation`, `window_indices`), `evaluate`, `save_checkpoint`, `defers_host_sync`
and `fault_point` are looked up in this module when called, so the tests can replace them here.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from lmforge.base.config import Config
from lmforge.base.distributed import all_reduce_sum, barrier, world_from_env
from lmforge.base.faults import fault_point
from lmforge.base.runtime import YOUNG_GARBAGE_EVERY, collector_paused, setup_runtime
from lmforge.base.tokenizer_config import settings_files
from lmforge.checkpoint import prune_epochs, save_checkpoint
from lmforge.data.store import read_meta
from lmforge.models.registry import flops_per_token, load_weights
from lmforge.ops.kernels import prepare_for_training
from lmforge.train.data_order import epoch_permutation, window_indices
from lmforge.train.evaluate import evaluate
from lmforge.train.flops import MFUMeter
from lmforge.train.init_from import check_resume_architecture, settle_init_from
from lmforge.train.epoch_summary import EpochSummary, best_metric_name, done_line
from lmforge.train.log import Interval, device_memory, format_eval_line, format_train_line, throughput
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.parallel import (NamedOptimizerState, check_strategy, full_model_state, plain_model, unwrap,
                                    wrap_model)
from lmforge.train.result import TrainResult
from lmforge.train.resume import finished_detail, reached_its_end, resumed_data_lines
from lmforge.train.setup import (build_model, check_run_folder_free, hold_run_folder, model_summary, open_run_folder,
                                 read_resume, steps_per_epoch)
from lmforge.train.signals import StopSignal
from lmforge.train.state import DataIdentity, LoopState, RngState, upgrade_training_state
from lmforge.train.step import forward_backward
from lmforge.train.tasks import best_score
from lmforge.train.trackers import RunTrackers, attach_trackers
from lmforge.train.update import DeviceCounters, defers_host_sync, device_update, host_update


def train(cfg: Config, *, resume_from: Path | None = None, quiet: bool = False, handle_signals: bool = False,
          notes: Sequence[str] = (), trackers: RunTrackers | None = None) -> TrainResult:
    """Train as `cfg` says; with `resume_from` (a checkpoint folder) continue that run exactly.

    quiet: no console lines and no progress bar (train.log and metrics.jsonl are written alike).
    handle_signals: SIGTERM / SIGINT stop the run gracefully (`lmforge.train.signals`); the CLI
    asks, a library caller's process keeps its handlers. notes: lines for train.log alone.
    trackers: the caller's, left open (run_training logs the report's plots to them); without
    them, train.loggers' trackers are opened and closed here.

    The run folder is this process's for the whole run (rank 0 holds it under torchrun; another
    process training into it gets an error naming this one).
    """
    with hold_run_folder(cfg.run_dir, enabled=world_from_env().rank == 0):
        return Trainer(cfg, resume_from=resume_from, quiet=quiet, notes=notes,
                       trackers=trackers).run(handle_signals=handle_signals)


class Trainer:
    """One run: `__init__` sets it up (and restores a resumed run's state), `run` steps until a
    stop reason, each `step` followed by its log line, `validate` and `save` when due, and
    `finish` closes the run. A resumed run that had already finished is left as it is
    (`finished`): nothing is opened or written."""

    def __init__(self, cfg: Config, *, resume_from: Path | None = None, quiet: bool = False,
                 notes: Sequence[str] = (), trackers: RunTrackers | None = None) -> None:
        cfg = settle_init_from(cfg)  # model.init_from's architecture: config.yaml records the model trained
        self.cfg, self.quiet = cfg, quiet
        t = cfg.train
        self.rt = setup_runtime(t.device, t.precision, t.seed, t.collective_timeout)
        check_strategy(t.strategy)
        self.data_dir, self.run_dir = Path(cfg.data.path), cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        meta = read_meta(self.data_dir)
        if resume_from is None:
            check_run_folder_free(self.run_dir)
        model, self.arch, self.task = build_model(cfg, meta, self.rt.device)
        self._setup_data(meta, model.config.context)
        barrier(0, "start")
        resumed = read_resume(resume_from) if resume_from is not None else None
        if resumed is not None:
            check_resume_architecture(self.arch, resumed.model_config, resumed.path)
            load_weights(model, resumed.state_dict, resumed.path)
        self._setup_optimizer(model)
        if resumed is not None:
            self.load_state_dict(resumed.training_state)
        self.finished = resumed is not None and reached_its_end(self.run_dir, self.state.step, self.total_steps)
        if self.finished:
            return
        self.log = open_run_folder(cfg, self.rt, self.state.step if resumed is not None else None, quiet, notes)
        attach_trackers(self.log, cfg, trackers, self.state.step if resumed is not None else None)
        if resumed is not None:  # what changed in the data since the checkpoint
            for line in resumed_data_lines(self.data_identity, self.state.position, self.window,
                                           len(self.train_ds), self.data_dir):
                self.log.line(line)
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        self._describe()

    # -- set-up ---------------------------------------------------------------------------------

    def _setup_data(self, meta: dict, context: int) -> None:
        t, self.context = self.cfg.train, context
        self.train_ds, self.val_ds = self.task.dataset("train"), self.task.dataset(self.cfg.data.val_split)
        self.window = t.batch_size * t.grad_accum * self.rt.world_size  # samples per optimizer step
        self.steps_per_epoch = steps_per_epoch(len(self.train_ds), meta, self.cfg, context, self.rt.world_size)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.data_identity = DataIdentity({"content_sha256": meta.get("content_sha256"),
                                           "train_samples": len(self.train_ds), "val_samples": len(self.val_ds)})

    def _setup_optimizer(self, model: nn.Module) -> None:
        self.model = wrap_model(model, self.cfg.train.strategy, self.rt.device, self.rt.world_size)
        self.optimizer = build_optimizer(self.model, self.cfg.train, self.rt.device)
        self.scaler = torch.amp.GradScaler(self.rt.device.type) if self.rt.precision == "fp16" else None
        self.state, self.epochs = LoopState(), EpochSummary(self.task)
        self.parts = {"loop": self.state, "optimizer": NamedOptimizerState(self.model, self.optimizer),
                      "rng": RngState(self.rt.device), "scaler": self.scaler, "data": self.data_identity,
                      "epochs": self.epochs}

    def _describe(self) -> None:
        rt, t = self.rt, self.cfg.train
        # MFU is against the peak of the units in use
        self.mfu = MFUMeter(rt.device, rt.autocast_dtype or torch.float32, flops_per_token(unwrap(self.model).config),
                            rt.world_size, t.peak_flops)
        self.log.line(f"lmforge train | {self.run_dir} | {rt.describe()}")
        self.log.line(prepare_for_training(rt.device))  # builds lmforge's CPU kernels on a first run
        self.log.line(f"{model_summary(unwrap(self.model), self.arch, t, self.context)} "
                      f"| train {len(self.train_ds):,} samples, {self.steps_per_epoch:,} steps/epoch | "
                      f"global batch {self.window} (micro {t.batch_size} x accum {t.grad_accum} x world "
                      f"{rt.world_size}) | {self.total_steps:,} steps"
                      + (f" | resumed at step {self.state.step}" if self.state.step else ""))
        if len(self.val_ds) == 0:
            self.log.line(f"warning: split {self.cfg.data.val_split!r} has no samples of {self.context} tokens; "
                          "evaluation and the best checkpoint are skipped")

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The training state of a checkpoint: the state dicts of the run's stateful parts, keyed
        by part; a collective under FSDP (the optimizer state is gathered), so every rank calls it."""
        training = {name: part.state_dict() for name, part in self.parts.items() if part is not None}
        return {**training, "world_size": self.rt.world_size}

    def load_state_dict(self, training: dict) -> None:
        training = upgrade_training_state(training)
        for name, part in self.parts.items():
            # fp16 resuming an fp32 run: the loss scale starts afresh; a checkpoint from before the
            # data (epochs) part: nothing to compare the data with (the epoch's sums start here)
            if part is None or (name in ("scaler", "data", "epochs") and name not in training):
                continue
            part.load_state_dict(training[name])

    # -- the run --------------------------------------------------------------------------------

    def run(self, handle_signals: bool = False) -> TrainResult:
        """Step until a stop reason, then finish; see `train` for handle_signals."""
        if self.finished:  # nothing to do, and nothing was opened
            return TrainResult(run_dir=self.run_dir, steps=self.state.step, reason="finished", is_main=self.rt.is_main,
                               best_val_loss=self.state.best_val_loss,
                               detail=finished_detail(self.cfg.train, self.run_dir, self.state.step, self.total_steps))
        with StopSignal(handle_signals) as self.stop, collector_paused():
            self._start()
            reason = "max_steps"
            while self.state.step < self.total_steps:
                stop_reason = self.step()
                if stop_reason is not None:
                    reason = stop_reason
                    break
            self.finish(reason)
        received = self.stop.received
        exit_code = 128 + received if received else (1 if reason == "non_finite" else 0)
        return TrainResult(run_dir=self.run_dir, steps=self.state.step, reason=reason,
                           best_val_loss=self.state.best_val_loss, last_eval=self.last_eval, elapsed=self.elapsed,
                           exit_code=exit_code, is_main=self.rt.is_main)

    def _start(self) -> None:
        self.model.train()
        # GPU with the fused AdamW: the step's numbers stay on the device until a log step reads them
        deferred = defers_host_sync(self.rt.device, self.optimizer)
        self.counters = DeviceCounters(self.rt.device, self.state.non_finite_in_row) if deferred else None
        self.last_eval, self.last_eval_step, self.last_saved = {}, -1, self.state.step
        if self.cfg.train.eval_at_start and not self.state.step:  # the untrained model's numbers, at step 0
            self.last_eval = self.validate("eval")
        now = time.perf_counter()
        self.session = (self.state.step, now)  # for the ETA
        self.start_time = now - self.state.elapsed
        self.interval = Interval(start=now, examples=self.state.examples)
        self.bar = tqdm(total=self.total_steps, initial=self.state.step, disable=True if self.quiet else None,
                        leave=False, dynamic_ncols=True, unit="step")
        self.task.start_epoch(self.train_ds, self.state.position.epoch)

    def step(self) -> str | None:
        """One optimizer step, then its log line, evaluation and saves when due; a stop reason or None."""
        state, t = self.state, self.cfg.train
        micro_batches, tokens, targets = self._next_window()
        lr = lr_at(state.step, t, self.total_steps)
        set_lr(self.optimizer, lr)
        elapsed = time.perf_counter() - self.start_time
        flags = {"stop_signal": float(self.stop.received is not None),
                 "time_up": float(t.max_time is not None and elapsed >= t.max_time), "tokens": tokens}
        sums, flags, grad_norm = self._update(micro_batches, targets, flags)
        tokens = int(flags["tokens"])
        state.step += 1
        if state.step % YOUNG_GARBAGE_EVERY == 0:
            gc.collect(1)  # the automatic collector is off while training (`collector_paused`)
        state.position.epoch_sample += self.window
        state.tokens += tokens
        state.examples += self.window
        self.interval.add(tokens, sums)
        self.bar.update(1)
        log_step = state.step % t.log_every == 0 or state.step == self.total_steps
        if self.counters is not None and log_step:  # the one host sync between log steps
            self.interval.sums, grad_norm = self._read_counters()
        if (self.counters is None or log_step) and state.non_finite_in_row >= t.max_non_finite:
            return "non_finite"  # stop with the last good checkpoint: the skipped updates left no NaN behind
        if log_step:
            self._log_train(lr, grad_norm)
        return self._after_step(flags)

    def _next_window(self) -> tuple[list[dict[str, torch.Tensor]], float, float]:
        """This rank's micro-batches of the next step, on the device, with their token and target
        counts (taken on the host copies: on a GPU, counting the device copies would wait for it)."""
        t, position = self.cfg.train, self.state.position
        permutation = epoch_permutation(len(self.train_ds), t.seed, position.epoch)
        micro_batches = [self.task.collate([self.train_ds[i] for i in indices]) for indices in
                         window_indices(permutation, position.epoch_sample, t.batch_size, t.grad_accum,
                                        self.rt.rank, self.rt.world_size)]
        tokens = float(sum(self.task.count_tokens(b) for b in micro_batches))
        targets = float(sum(self.task.count_targets(b) for b in micro_batches))
        return ([{k: v.to(self.rt.device, non_blocking=True) for k, v in b.items()} for b in micro_batches],
                tokens, targets)

    def _update(self, micro_batches: list[dict[str, torch.Tensor]], targets: float,
                flags: dict[str, float]) -> tuple[dict[str, float], dict[str, float], float | None]:
        """Forward, backward and the optimizer update of one window. Returns the step's sums on the
        host (empty while they stay on the device), `flags` summed over ranks, and the gradient norm
        (None while it stays on the device)."""
        rt, t, step = self.rt, self.cfg.train, self.state.step + 1
        if self.counters is not None:
            sums = forward_backward(self.forward_model, self.task, micro_batches, self.state, rt, self.scaler,
                                    self.log, local_targets=targets, to_host=False)
            # flags are host numbers, summed over ranks on the host: no device wait
            totals = all_reduce_sum(torch.tensor(list(flags.values()), dtype=torch.float64), step, "flags")
            skipped, norm = device_update(self.model, self.optimizer, self.scaler, t.grad_clip, sums["loss_sum"],
                                          check_loss=rt.world_size == 1)
            self.counters.add(sums, skipped, norm)
            self.epochs.add(sums)
            return {}, dict(zip(flags, totals.tolist())), None
        sums = forward_backward(self.forward_model, self.task, micro_batches, self.state, rt, self.scaler,
                                self.log, flags, local_targets=targets)
        flags = {name: sums.pop(name) for name in list(flags)}
        self.epochs.add(sums)
        grad_norm, self.state.non_finite_in_row = host_update(self.model, self.optimizer, self.scaler, t.grad_clip,
                                                              sums, step, self.state.non_finite_in_row, self.log)
        return sums, flags, grad_norm

    def _read_counters(self) -> tuple[dict[str, float], float]:
        """Deferred mode: the sums and the last gradient norm since the last read; warns of skips."""
        sums, skipped, self.state.non_finite_in_row, norm = self.counters.read(self.state.step)
        if skipped:
            self.log.line(f"warning: {skipped} update(s) up to step {self.state.step} skipped: loss or gradient "
                          f"norm not finite ({self.state.non_finite_in_row} in a row)")
        return sums, norm

    def _log_train(self, lr: float, grad_norm: float) -> None:
        state, now = self.state, time.perf_counter()
        unit = self.task.throughput_unit
        rates = throughput(unit, self.interval.tokens, state.examples - self.interval.examples,
                           now - self.interval.start)
        metrics = self.task.summarize(self.interval.sums)
        session_step, session_start = self.session
        eta = (self.total_steps - state.step) * (now - session_start) / max(1, state.step - session_step)
        mfu, memory = self.mfu(rates["tokens_per_s"]), device_memory(self.rt.device)
        where = state.where(len(self.train_ds))
        self.log.event("train", **where, **metrics, lr=lr, grad_norm=grad_norm, **rates, mfu=mfu,
                       time=now - self.start_time, **memory)
        self.log.line(format_train_line(state.step, self.total_steps, where["epoch"], metrics["loss"],
                                        metrics.get("accuracy"), lr, rates.get(f"{unit}_per_s", rates["tokens_per_s"]),
                                        mfu, eta, self.task.console_extras(metrics), unit=unit, memory=memory))
        self.interval = Interval(start=time.perf_counter(), examples=state.examples)

    def _after_step(self, flags: dict[str, float]) -> str | None:
        """Evaluation, checkpoints and the stop decisions that follow a step; a stop reason or None."""
        state, t = self.state, self.cfg.train
        paused = time.perf_counter()
        epoch_done = state.position.turn_epoch_if_done(self.window, len(self.train_ds))
        if epoch_done:  # closed before a checkpoint of this step (best, epoch, last) records the epochs
            self.epochs.end_epoch(state.position.epoch, state.step, paused - self.start_time, self.log)
        if state.step % t.eval_every == 0 or epoch_done:
            self.last_eval = self.validate("epoch" if epoch_done else "eval") or self.last_eval
        state.elapsed = time.perf_counter() - self.start_time
        if epoch_done:
            self.save(f"epoch-{state.position.epoch}")
            if self.rt.is_main:  # the writer alone deletes
                prune_epochs(self.ckpt_dir, t.keep_epochs)
            self.task.start_epoch(self.train_ds, state.position.epoch)
        if state.step % (t.save_every or t.eval_every) == 0 or epoch_done:
            self.save("last")
        self.interval.start += time.perf_counter() - paused  # tokens/s measures training only
        if t.patience is not None and state.evals_since_best >= t.patience:
            return "early_stop"
        # Decided from flags summed over ranks, so every rank stops at the same step.
        if flags["time_up"] > 0:
            return "max_time"
        if flags["stop_signal"] > 0:
            return "signal"
        fault_point(f"after_step_{state.step}")
        return None

    def validate(self, kind: str) -> dict:
        """Validation metrics now ({} without validation samples), logged; saves `best` when
        train.best_metric improved (at step 0 too, with train.eval_at_start)."""
        state, t, task = self.state, self.cfg.train, self.task
        self.last_eval_step = state.step
        result = evaluate(self.forward_model, task, self.val_ds, t.batch_size, t.eval_batches, self.rt)
        if not result:
            return result
        where = state.where(len(self.train_ds))
        self.log.event(kind, split=self.cfg.data.val_split, **where, **result)
        on_train = None
        if task.eval_train:
            on_train = evaluate(self.forward_model, task, self.train_ds, t.batch_size, t.eval_batches, self.rt)
            self.log.event(kind, split="train", **where, **on_train)
        self.log.line(format_eval_line(kind, state.step, result, task.reports_perplexity,
                                       task.console_extras(result), on_train))
        state.best_val_loss = min(state.best_val_loss, result["loss"])
        score = best_score(self.cfg, task, result)
        if score < state.best_score:
            state.best_score, state.evals_since_best = score, 0
            self.save("best")
        else:
            state.evals_since_best += 1
        return result

    def save(self, name: str) -> None:
        """Checkpoint `name`: full weights and the training state. Every rank takes part (FSDP
        gathers the shards); rank 0 alone writes."""
        state = self.state
        if self.counters is not None:  # deferred mode: the count of skipped steps in a row, for resume
            state.non_finite_in_row = int(self.counters.in_row.item())
        weights = full_model_state(self.model, self.rt.world_size)
        training = self.state_dict()
        if self.rt.is_main:
            save_checkpoint(self.ckpt_dir / name, model_state=weights, model_config=self.arch,
                            tokenizer_file=self.data_dir / "tokenizer.json", run_config=self.cfg.to_dict(),
                            tokenizer_extras=settings_files(self.data_dir),  # chat template, named tokens
                            training_state=training, step=state.step,
                            epoch=state.where(len(self.train_ds))["epoch"])
        barrier(state.step, f"saving checkpoint {name}")
        if name == "last":
            self.last_saved = state.step

    def finish(self, reason: str) -> None:
        """Close the run: unless it stopped on non-finite numbers, a last evaluation (not after a
        signal) and `last`; samples and the task's final report after a normal end; the end event."""
        state = self.state
        self.bar.close()
        if reason != "non_finite":
            if self.last_eval_step != state.step and reason != "signal":
                self.last_eval = self.validate("eval") or self.last_eval
            state.elapsed = time.perf_counter() - self.start_time
            if self.last_saved != state.step:
                self.save("last")
        if reason not in ("non_finite", "signal"):
            plain = plain_model(self.model, self.arch, self.rt)  # every rank takes part in gathering FSDP shards
            if self.rt.is_main:
                self._samples_and_report(plain)
            barrier(state.step, "final samples and report")
        self.elapsed = time.perf_counter() - self.start_time
        self.log.event("end", **state.where(len(self.train_ds)), reason=reason, best_val_loss=state.best_val_loss,
                       time=self.elapsed)
        self.epochs.finish(self.log)
        self.log.line(done_line(reason, state.step, self.elapsed, best_metric_name(self.cfg, self.task),
                                state.best_score, self.ckpt_dir))
        self.log.close()

    def _samples_and_report(self, plain: nn.Module) -> None:
        where = self.state.where(len(self.train_ds))
        samples = self.task.samples(plain, self.rt)
        if samples:
            self.log.event("samples", **where, samples=samples)
            for sample in samples:
                self.log.line(f"--- sample ---\n{sample['prompt']}{sample['text']}")
        self.task.final_report(plain, self.rt, self.log, where)
