"""The one training loop every task uses.

A task supplies datasets, a collate function and `loss_and_metrics(model, batch)`; this file
owns everything else: the optimizer step over an accumulation window, clipping, the schedule,
logging, evaluation, checkpoints, early stopping, out-of-memory and non-finite recovery, and
exact resume.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmforge.base.config import Config, save_config
from lmforge.data.store import read_meta
from lmforge.base.faults import fault_point
from lmforge.models.registry import flops_per_token  # GPT or BERT config
from lmforge.models.registry import architecture, load_weights, model_from_architecture
from lmforge.base.runtime import Runtime, setup_runtime
from lmforge.checkpoint import Checkpoint, ignore_sigxfsz, load_checkpoint, save_checkpoint
from lmforge.checkpoint.retention import clean_stale_temp, prune_epochs
from lmforge.train.data_order import epoch_permutation, window_indices
from lmforge.train.update import DeviceCounters, defers_host_sync, device_update, host_update
from lmforge.train.evaluate import evaluate
from lmforge.train.flops import measured_peak_flops, raise_peak
from lmforge.train.log import RunLogger, format_train_line, truncate_metrics
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.base.distributed import (all_reduce_sum, barrier, full_model_state,
                                       full_optimizer_state, gradient_sync, load_optimizer_state, unwrap,
                                       wrap_model)
from lmforge.train.tasks import add_sums, best_score, make_task


@dataclass
class LoopState:
    """Loop position and history; saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    epoch_sample: int = 0
    """Samples of this epoch's permutation already consumed (by all ranks together)."""
    tokens: int = 0
    examples: int = 0
    best_val_loss: float = math.inf
    best_score: float = math.inf  # train.best_metric, lower is better (see tasks.best_score)
    evals_since_best: int = 0
    non_finite_in_row: int = 0
    micro_split: int = 1
    elapsed: float = 0.0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    reason: str
    best_val_loss: float
    last_eval: dict = field(default_factory=dict)
    elapsed: float = 0.0
    exit_code: int = 0


class _StopSignal:
    """SIGTERM/SIGINT finish the current step, save, and stop; a second signal changes nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "_StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass  # not the main thread: no handlers
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, *, resume_from: Path | None = None, quiet: bool = False) -> TrainResult:
    """Train as `cfg` says; with `resume_from` (a checkpoint folder) continue that run exactly."""
    rt = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.seed, cfg.train.collective_timeout)
    ignore_sigxfsz()  # a full disk must surface as an error we can report, not kill the process
    data_dir = Path(cfg.data.path)
    meta = read_meta(data_dir)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    if resume_from is None and ckpt_dir.exists() and any(p.name[0] != "." for p in ckpt_dir.iterdir()):
        raise ValueError(f"{run_dir} already holds a run; continue it with `lmforge train --resume {run_dir}` "
                         "or choose another run.name")

    model, arch = _build_model(cfg, meta)
    model.to(rt.device)
    task = make_task(cfg, meta, model.config.context)
    if hasattr(task, "prepare_model"):  # hook (classify): wrap the backbone in a head, freeze by train.trainable
        model, arch = task.prepare_model(model, arch)
        model.to(rt.device)
    train_ds, val_ds = task.dataset("train"), task.dataset(cfg.data.val_split)
    window = cfg.train.batch_size * cfg.train.grad_accum * rt.world_size  # samples per optimizer step
    steps_per_epoch = len(train_ds) // window
    if steps_per_epoch == 0:
        raise ValueError(f"{data_dir}: {len(train_ds)} training samples, fewer than one optimizer step "
                         f"needs (batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} "
                         f"x {rt.world_size} processes); lower them or add data")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    if rt.is_main and ckpt_dir.exists():
        clean_stale_temp(ckpt_dir)
    barrier(0, "start")
    resumed = _read_resume(resume_from) if resume_from is not None else None
    if resumed is not None:
        load_weights(model, resumed.state_dict, resumed.path)
    model = wrap_model(model, cfg.train.strategy, rt.device, rt.world_size)
    optimizer = build_optimizer(model, cfg.train, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    state = LoopState()
    if resumed is not None:
        state = _restore_training(resumed.training_state, model, optimizer, scaler, rt)
    if rt.is_main:
        truncate_metrics(run_dir, state.step if resumed is not None else -1)  # no history past the restart point
        if resumed is None:
            (run_dir / "train.log").unlink(missing_ok=True)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = RunLogger(run_dir, enabled=rt.is_main, quiet=quiet)
    forward_model = torch.compile(model) if cfg.train.compile else model
    tokenizer_file = data_dir / "tokenizer.json"

    def read_counters() -> tuple[dict[str, float], float]:
        """Deferred mode: the sums and the last gradient norm since the last read; warns of skips."""
        sums, skipped, state.non_finite_in_row, norm = counters.read(state.step)
        if skipped:
            log.line(f"warning: {skipped} update(s) up to step {state.step} skipped: loss or gradient norm "
                     f"not finite ({state.non_finite_in_row} in a row)")
        return sums, norm

    def save(name: str) -> None:
        # Every rank takes part (FSDP gathers the shards); rank 0 alone writes.
        if counters is not None:  # deferred mode: the count of skipped steps in a row, for resume
            state.non_finite_in_row = int(counters.in_row.item())
        weights = full_model_state(model, rt.world_size)
        training_state = _training_state(state, model, optimizer, scaler, rt)
        if rt.is_main:
            save_checkpoint(ckpt_dir / name, model_state=weights, model_config=arch,
                            tokenizer_file=tokenizer_file, run_config=cfg.to_dict(),
                            training_state=training_state,
                            step=state.step, epoch=_position(state, len(train_ds))["epoch"])
        barrier(state.step, f"saving checkpoint {name}")

    def run_eval(kind: str) -> dict:
        nonlocal last_eval_step
        last_eval_step = state.step
        result = evaluate(forward_model, task, val_ds, cfg.train.batch_size, cfg.train.eval_batches, rt)
        if not result:
            return result
        log.event(kind, split=cfg.data.val_split, **_position(state, len(train_ds)), **result)
        line = (f"{kind} step {state.step} | val loss {result['loss']:.4f}"
                + (f" | ppl {result['perplexity']:.2f}" if task.name in ("lm", "dialogue") else "")
                + (f" | acc {result['accuracy']:.1%}" if "accuracy" in result else "")
                + "".join(f" | {k} {v:.4f}" for k, v in task.console_extras(result).items()))
        if getattr(task, "eval_train", False):  # hook (classify): the same metrics on a few train batches
            on_train = evaluate(forward_model, task, train_ds, cfg.train.batch_size, cfg.train.eval_batches, rt)
            log.event(kind, split="train", **_position(state, len(train_ds)), **on_train)
            line += f" | train loss {on_train['loss']:.4f} | train acc {on_train['accuracy']:.1%}"
        log.line(line)
        state.best_val_loss = min(state.best_val_loss, result["loss"])
        score = best_score(cfg, task, result)  # train.best_metric (classify: val accuracy)
        if score < state.best_score:
            state.best_score, state.evals_since_best = score, 0
            save("best")
        else:
            state.evals_since_best += 1
        return result

    compute_dtype = rt.autocast_dtype or torch.float32  # MFU is against the peak of the units in use
    peak = cfg.train.peak_flops or measured_peak_flops(rt.device, compute_dtype)
    flops_tok = flops_per_token(unwrap(model).config)
    log.line(f"lmforge train | {run_dir} | {rt.describe()}")
    log.line(f"model {arch['model_type']} {sum(p.numel() for p in model.parameters()):,} parameters | "
             f"train {len(train_ds):,} samples, {steps_per_epoch:,} steps/epoch | global batch {window} "
             f"(micro {cfg.train.batch_size} x accum {cfg.train.grad_accum} x world {rt.world_size}) | "
             f"{total_steps:,} steps" + (f" | resumed at step {state.step}" if state.step else ""))
    if len(val_ds) == 0:
        log.line(f"warning: split {cfg.data.val_split!r} has no samples of {unwrap(model).config.context} tokens; "
                 "evaluation and the best checkpoint are skipped")

    model.train()
    deferred = defers_host_sync(rt.device, optimizer)  # GPU: numbers stay on the device until a log step
    counters = DeviceCounters(rt.device, state.non_finite_in_row) if deferred else None
    reason, last_eval, last_saved, last_eval_step = "max_steps", {}, state.step, -1
    session_step, session_start = state.step, time.perf_counter()
    interval_sums: dict[str, float] = {}
    interval_tokens, interval_start = 0, time.perf_counter()
    interval_examples = state.examples  # hook (mlm): samples/s as "{task.throughput_unit}_per_s"
    start_time = time.perf_counter() - state.elapsed
    bar = tqdm(total=total_steps, initial=state.step, disable=None if not quiet else True,
               leave=False, dynamic_ncols=True, unit="step")
    with _StopSignal() as stop:
        while state.step < total_steps:
            permutation = epoch_permutation(len(train_ds), cfg.train.seed, state.epoch)
            if hasattr(train_ds, "set_epoch"):  # hook (mlm): sentence pairs are drawn anew per epoch
                train_ds.set_epoch(state.epoch)
            micro_batches = [task.collate([train_ds[i] for i in indices]) for indices in
                             window_indices(permutation, state.epoch_sample, cfg.train.batch_size,
                                            cfg.train.grad_accum, rt.rank, rt.world_size)]
            # counted on the host copies: on a GPU, counting the device copies would wait for it
            window_tokens = float(sum(task.count_tokens(b) for b in micro_batches))
            window_targets = float(sum(task.count_targets(b) for b in micro_batches))
            micro_batches = [{k: v.to(rt.device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
            lr = lr_at(state.step, cfg.train, total_steps)
            set_lr(optimizer, lr)
            elapsed = time.perf_counter() - start_time
            flags = {"stop_signal": float(stop.received is not None),
                     "time_up": float(cfg.train.max_time is not None and elapsed >= cfg.train.max_time)}
            flags["tokens"] = window_tokens
            sums = _forward_backward(forward_model, task, micro_batches, state, rt, scaler, log,
                                     None if deferred else flags, local_targets=window_targets, to_host=not deferred)
            if deferred:  # flags are host numbers, summed over ranks on the host: no device wait
                flags = dict(zip(flags, all_reduce_sum(torch.tensor(list(flags.values()), dtype=torch.float64),
                                                       state.step + 1, "flags").tolist()))
                skipped, norm = device_update(model, optimizer, scaler, cfg.train.grad_clip, sums["loss_sum"],
                                              check_loss=rt.world_size == 1)
                counters.add(sums, skipped, norm)
                sums = {}
            else:
                flags = {name: sums.pop(name) for name in list(flags)}
                grad_norm, state.non_finite_in_row = host_update(model, optimizer, scaler, cfg.train.grad_clip, sums,
                                                              state.step + 1, state.non_finite_in_row, log)
                if state.non_finite_in_row >= cfg.train.max_non_finite:
                    reason = "non_finite"
            stop_requested, time_up = flags["stop_signal"] > 0, flags["time_up"] > 0
            tokens = int(flags["tokens"])
            state.step += 1
            state.epoch_sample += window
            state.tokens += tokens
            state.examples += window
            interval_tokens += tokens
            for key, value in sums.items():
                interval_sums[key] = interval_sums.get(key, 0.0) + value
            bar.update(1)
            log_step = state.step % cfg.train.log_every == 0 or state.step == total_steps
            if deferred and log_step:  # the one host sync between log steps
                interval_sums, grad_norm = read_counters()
                if state.non_finite_in_row >= cfg.train.max_non_finite:
                    reason = "non_finite"
            if reason == "non_finite":
                break  # stop with the last good checkpoint; the skipped updates left no NaN behind

            if log_step:
                now = time.perf_counter()
                rate = interval_tokens / max(1e-9, now - interval_start)
                metrics = task.summarize(interval_sums)
                eta = (total_steps - state.step) * (now - session_start) / max(1, state.step - session_step)
                mfu = flops_tok * rate / (peak * rt.world_size) if peak else None
                if mfu is not None and mfu > 1.0 and not cfg.train.peak_flops:  # measured on busy cores
                    peak, mfu = flops_tok * rate / rt.world_size, 1.0
                    raise_peak(rt.device, peak, compute_dtype)
                if getattr(task, "throughput_unit", "tok") != "tok":
                    metrics[f"{task.throughput_unit}_per_s"] = ((state.examples - interval_examples)
                                                                / max(1e-9, now - interval_start))
                log.event("train", **_position(state, len(train_ds)), **metrics, lr=lr,
                          grad_norm=grad_norm, tokens_per_s=rate, mfu=mfu, time=now - start_time)
                log.line(format_train_line(state.step, total_steps, _position(state, len(train_ds))["epoch"],
                                           metrics["loss"], metrics.get("accuracy"), lr, rate, mfu, eta,
                                           task.console_extras(metrics)))
                interval_sums, interval_tokens, interval_start = {}, 0, time.perf_counter()
                interval_examples = state.examples

            housekeeping_start = time.perf_counter()
            epoch_done = state.epoch_sample + window > len(train_ds)
            if epoch_done:
                state.epoch, state.epoch_sample = state.epoch + 1, 0
            if state.step % cfg.train.eval_every == 0 or epoch_done:
                last_eval = run_eval("epoch" if epoch_done else "eval") or last_eval
            state.elapsed = time.perf_counter() - start_time
            if epoch_done:
                save(f"epoch-{state.epoch}")
                prune_epochs(ckpt_dir, cfg.train.keep_epochs)
            if state.step % (cfg.train.save_every or cfg.train.eval_every) == 0 or epoch_done:
                save("last")
                last_saved = state.step
            interval_start += time.perf_counter() - housekeeping_start  # tokens/s measures training only
            if cfg.train.patience is not None and state.evals_since_best >= cfg.train.patience:
                reason = "early_stop"
                break
            # Decided from flags summed over ranks, so every rank stops at the same step.
            if time_up:
                reason = "max_time"
                break
            if stop_requested:
                reason = "signal"
                break
            fault_point(f"after_step_{state.step}")
        bar.close()
        if reason != "non_finite":
            if last_eval_step != state.step and reason != "signal":
                last_eval = run_eval("eval") or last_eval
            state.elapsed = time.perf_counter() - start_time
            if last_saved != state.step:
                save("last")
        if reason not in ("non_finite", "signal"):
            plain = _plain_model(model, arch, rt)  # every rank takes part in gathering FSDP shards
            if rt.is_main:
                samples = task.samples(plain, rt)
                if samples:
                    log.event("samples", **_position(state, len(train_ds)), samples=samples)
                    for sample in samples:
                        log.line(f"--- sample ---\n{sample['prompt']}{sample['text']}")
                if hasattr(task, "final_report"):  # hook (classify): full-split metrics of the best checkpoint
                    task.final_report(plain, rt, log, _position(state, len(train_ds)))
            barrier(state.step, "final samples and report")
    elapsed = time.perf_counter() - start_time
    log.event("end", **_position(state, len(train_ds)), reason=reason,
              best_val_loss=state.best_val_loss, time=elapsed)
    log.line(f"done: {reason} at step {state.step} in {elapsed:.1f}s | best val loss {state.best_val_loss:.4f}")
    log.close()
    exit_code = 128 + stop.received if stop.received else (1 if reason == "non_finite" else 0)
    return TrainResult(run_dir=run_dir, steps=state.step, reason=reason, best_val_loss=state.best_val_loss,
                       last_eval=last_eval, elapsed=elapsed, exit_code=exit_code)


def _plain_model(model: nn.Module, arch: dict, rt: Runtime) -> nn.Module:
    """The trained model as one ordinary module (for generation and reports on rank 0)."""
    if rt.world_size == 1:
        return unwrap(model)
    weights = full_model_state(model, rt.world_size)
    plain = model_from_architecture(arch)
    if rt.is_main:
        load_weights(plain, weights, "the trained model")
    return plain.to(rt.device)


def _build_model(cfg: Config, meta: dict) -> tuple[nn.Module, dict]:
    vocab_size = int(meta["vocab_size"])
    if cfg.model.init_from is None:
        arch = architecture(cfg.model, vocab_size)
        return model_from_architecture(arch), arch
    ckpt = load_checkpoint(Path(cfg.model.init_from))
    if ckpt.model_config.get("vocab_size") != vocab_size:
        raise ValueError(f"model.init_from {cfg.model.init_from}: its vocabulary has "
                         f"{ckpt.model_config.get('vocab_size')} tokens but the data in {cfg.data.path} "
                         f"was tokenized with {vocab_size}; prepare the data with the checkpoint's tokenizer")
    arch = dict(ckpt.model_config, dropout=cfg.model.dropout)
    model = model_from_architecture(arch)
    load_weights(model, ckpt.state_dict, ckpt.path)
    return model, arch


def _forward_backward(model, task, micro_batches, state: LoopState, rt: Runtime, scaler, log,
                      flags: dict[str, float] | None = None, local_targets: float | None = None,
                      to_host: bool = True) -> dict:
    """Forward and backward over one accumulation window, normalised by the window's targets
    on all ranks together; returns the window's sums (and `flags`) summed over ranks, or with
    to_host=False this process's sums as device tensors (no host sync).

    Gradients are synchronised only on the last micro-step. Out of memory (one process):
    drop the partial gradients, split every micro-batch in two and redo the window; the
    effective batch and the result are unchanged.
    """
    if local_targets is None:
        local_targets = float(sum(task.count_targets(b) for b in micro_batches))
    total_targets = all_reduce_sum(torch.tensor([local_targets]), state.step + 1, "target count").item()
    # DDP and FSDP average gradients over ranks: scale back up so the result is the global mean.
    scale = rt.world_size / max(1.0, total_targets)
    while True:
        try:
            sums: dict[str, torch.Tensor] = {}
            pieces = [p for batch in micro_batches for p in _split_batch(batch, state.micro_split)]
            for index, piece in enumerate(pieces):
                with gradient_sync(model, index == len(pieces) - 1):
                    with rt.autocast():
                        stats = task.loss_and_metrics(model, piece)
                    loss = stats.loss_sum * scale
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                add_sums(sums, stats)
            break
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err):
                raise
            if rt.world_size > 1:
                raise RuntimeError(f"out of memory at step {state.step + 1} on rank {rt.rank}; with several "
                                   "processes lower train.batch_size (raise grad_accum to keep the batch)") from err
            model.zero_grad(set_to_none=True)
            _free_memory(rt)
            rows = max(b["input_ids"].shape[0] for b in micro_batches)
            if rows // state.micro_split <= 1:
                raise RuntimeError(f"out of memory at step {state.step + 1} with a micro-batch of one sample; "
                                   "lower model.context or the model size") from err
            state.micro_split *= 2
            log.line(f"warning: out of memory at step {state.step + 1}; retrying with micro-batches split "
                     f"{state.micro_split} ways (same effective batch)")
    if not to_host:
        return sums
    device = next(iter(sums.values())).device
    for name, value in (flags or {}).items():
        sums[name] = torch.tensor(value, dtype=torch.float64, device=device)
    names = list(sums)
    totals = torch.stack([sums[n].double().reshape(()) for n in names])
    return dict(zip(names, all_reduce_sum(totals.cpu(), state.step + 1, "metrics").tolist()))  # one host sync


def _split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    if parts == 1:
        return [batch]
    pieces = {k: torch.tensor_split(v, parts) for k, v in batch.items()}
    return [{k: pieces[k][i] for k in batch} for i in range(parts) if pieces["input_ids"][i].shape[0]]


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "out of memory" in text or "can't allocate memory" in text


def _free_memory(rt: Runtime) -> None:
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()


def _position(state: LoopState, train_samples: int) -> dict:
    """Where the run is: steps, fractional epochs (by samples, whatever the world size), tokens, examples."""
    return {"step": state.step, "epoch": round(state.epoch + state.epoch_sample / train_samples, 4),
            "tokens": state.tokens, "examples": state.examples}


def _training_state(state: LoopState, model: nn.Module, optimizer, scaler, rt: Runtime) -> dict:
    """Everything besides the weights that an exact resume needs; the optimizer state is keyed
    by parameter names, so it loads whatever the world size."""
    training = {"loop": asdict(state), "optimizer": full_optimizer_state(model, optimizer),
                "rng_torch": torch.get_rng_state(), "world_size": rt.world_size}
    if scaler is not None:
        training["scaler"] = scaler.state_dict()
    if rt.device.type == "cuda":
        training["rng_cuda"] = torch.cuda.get_rng_state(rt.device)
    return training


def _read_resume(path: Path) -> Checkpoint:
    ckpt = load_checkpoint(path, with_training_state=True)
    if not ckpt.training_state:
        raise ValueError(f"{path}: this checkpoint has no training state (weights only); "
                         "start a new run with model.init_from instead of --resume")
    return ckpt


def _restore_training(training: dict, model: nn.Module, optimizer, scaler, rt: Runtime) -> LoopState:
    load_optimizer_state(model, optimizer, training["optimizer"])
    if scaler is not None and "scaler" in training:
        scaler.load_state_dict(training["scaler"])
    torch.set_rng_state(training["rng_torch"])
    if rt.device.type == "cuda" and "rng_cuda" in training:
        torch.cuda.set_rng_state(training["rng_cuda"], rt.device)
    return LoopState(**training["loop"])
