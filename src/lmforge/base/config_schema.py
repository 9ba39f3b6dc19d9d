"""What a run config holds: its sections as dataclasses, a default and a docstring per field,
and each field's own checks (`__post_init__`), which collect every problem with its dotted key.

Reading a config (YAML, `section.key=value` overrides, types, nearest-key hints) is
`lmforge.base.config`, which re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Task = Literal["lm", "mlm", "classify", "dialogue"]
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["linear", "cosine", "constant"]
Device = Literal["auto", "cpu", "cuda", "mps"]
BestMetric = Literal["auto", "val_loss", "val_accuracy", "val_rmse", "val_mae"]
TRACKERS = ("tensorboard", "wandb", "mlflow")
"""The built-in train.loggers (lmforge.train.trackers)."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    kind: Literal["gpt", "bert", "llama"] = "gpt"
    """Architecture family: gpt (GPT-2), bert, llama (Llama-class: rotary positions, RMSNorm,
    SwiGLU, grouped-query attention; Llama, Mistral, Qwen2 and SmolLM shapes)."""
    preset: str | None = "mini"
    """Named size (`lmforge.models.gpt.GPT_PRESETS`, `bert.BERT_PRESETS`, `llama_config.LLAMA_PRESETS`:
    tiny, mini, small, medium, smollm-135m, qwen2-0.5b); fields below override it."""
    n_layer: int | None = None
    """Transformer blocks."""
    n_head: int | None = None
    """Attention heads per block."""
    n_embd: int | None = None
    """Hidden width; must be divisible by n_head."""
    context: int | None = None
    """Maximum sequence length (learned positions; llama: rotary positions, the KV cache's bound)."""
    intermediate_size: int | None = None
    """Width of the feed-forward; null: 4 x n_embd (gpt, bert), 8/3 x n_embd rounded up to 64 (llama)."""
    n_kv_head: int | None = None
    """llama: key / value heads (grouped-query attention), dividing n_head; 1 is multi-query; null: n_head."""
    rope_theta: float | None = None
    """llama: base of the rotary angles (null: 10000, or the preset's)."""
    rope_scaling: Literal["none", "linear"] = "none"
    """llama: rotary scaling of a new model: none, or linear (positions divided by rope_scaling_factor)."""
    rope_scaling_factor: float = 1.0
    """llama: the linear rope scaling factor."""
    rms_norm_eps: float | None = None
    """llama: RMSNorm epsilon (null: 1e-5, or the preset's)."""
    attention_bias: Literal["none", "qkv", "all"] | None = None
    """llama: biases of the attention projections: none (Llama), qkv (Qwen2), all; null: the preset's."""
    mlp_bias: bool | None = None
    """llama: biases in the SwiGLU projections (null: none)."""
    tie_embeddings: bool | None = None
    """llama: the output layer is the input embedding (null: the preset's; untied otherwise). GPT always ties."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual paths."""
    activation: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"] = "gelu"
    """Feed-forward activation of a new model: gelu (exact, as BERT and nanoGPT; on CPU about 4x
    faster than the tanh form), gelu_new (GPT-2's tanh approximation), relu. A checkpoint keeps its own."""
    init_from: str | None = None
    """A checkpoint folder to start from instead of random weights (fine-tuning)."""
    num_labels: int | None = None
    """classify: outputs of the head; null: the data's (its label count, 1 for a folder prepared with
    --regression). 1 is a regression head (MSE), which needs such a folder."""

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        errors: list[str] = []
        _check(errors, 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        for name in ("n_layer", "n_head", "n_embd", "context", "intermediate_size", "n_kv_head",
                     "rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            _check(errors, value is None or value > 0, f"model.{name}", "must be positive")
        _check(errors, self.rope_scaling_factor >= 1.0, "model.rope_scaling_factor", "must be >= 1")
        _check(errors, self.num_labels is None or self.num_labels >= 1, "model.num_labels",
               "must be >= 1 (1: regression) or null (the data's)")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """A folder written by `lmforge prepare` (token store + meta.json)."""
    val_split: str = "val"
    """Which split validation reads."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, bool(self.path), "data.path", "is required: the folder written by `lmforge prepare`")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """Low-rank adapters (LoRA): the model's weights stay frozen and each targeted linear layer
    learns W + (alpha / rank) * B @ A, B (out, rank) starting at zero, A (rank, in)."""

    rank: int = 0
    """The adapters' rank r; 0 turns LoRA off. Needs model.init_from (the frozen base)."""
    alpha: float = 16.0
    """The scale is alpha / rank (as peft's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (as peft's lora_dropout)."""
    targets: list[str] = field(default_factory=list)
    """Which linear layers get adapters, by name: a layer matches a name equal to its last
    components (c_attn, attn.c_proj, query) or a regular expression matching its whole name;
    empty: every linear layer inside the transformer blocks."""
    trainable: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, by name as for targets (a classifier's
    head, `classifier`, always is); saved with the adapter (peft's modules_to_save)."""

    def __post_init__(self) -> None:
        _check_finite(self, "train.lora")
        errors: list[str] = []
        _check(errors, self.rank >= 0, "train.lora.rank", "must be >= 0 (0: no LoRA)")
        _check(errors, self.alpha > 0, "train.lora.alpha", "must be positive")
        _check(errors, 0.0 <= self.dropout < 1.0, "train.lora.dropout", "must be in [0, 1)")
        for name in ("targets", "trainable"):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as err:
                    errors.append(f"train.lora.{name}[{i}]: {pattern!r} is not a regular expression ({err})")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    task: Task = "lm"
    """What is learned; must match the prepared data's task."""
    batch_size: int = 8
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalised over the whole window)."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of decay, as a fraction of `lr`."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only."""
    beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    beta2: float = 0.95
    """AdamW's decay rate of the squared gradient's running mean (0.95, as GPT-2 runs use)."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: Schedule = "cosine"
    """Decay after warmup."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Train exactly this many optimizer steps, cycling through epochs as needed."""
    max_time: float | None = None
    """Stop (with a checkpoint) after this many seconds of training."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm once per optimizer step; null disables."""
    log_every: int = 10
    """Optimizer steps between log lines."""
    eval_every: int = 200
    """Optimizer steps between evaluations (and an evaluation at each epoch end)."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    save_every: int | None = None
    """Optimizer steps between `last` checkpoints; default: every evaluation."""
    keep_epochs: int = 3
    """Keep the newest K epoch checkpoints."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    precision: Precision = "fp32"
    """fp32, or autocast to bf16/fp16 (fp16 uses a gradient scaler)."""
    compile: bool = False
    """torch.compile the model."""
    seed: int = 1337
    """Seeds weights, data order and dropout."""
    device: Device = "auto"
    """auto picks cuda, then mps, then cpu."""
    max_non_finite: int = 5
    """Stop after this many optimizer steps in a row with a NaN/inf loss."""
    peak_flops: float | None = None
    """The device's peak FLOP/s for MFU (e.g. 312e12 for an A100 in bf16); null measures it once
    and caches it (see lmforge.train.flops)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Several processes (torchrun): ddp replicates the model, fsdp shards it across ranks."""
    collective_timeout: float = 600.0
    """Seconds a rank waits for the others before the run fails naming the step (hung rank)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    """Prompts for the sample generations written at the end of training (lm)."""
    sample_tokens: int = 200
    """New tokens per sample generation."""
    trainable: str = "all"
    """Which parameters a fine-tune trains (every task): all, head (the output layer: the
    classifier, GPT's tied lm_head, BERT's pretraining heads), or last_blocks:K (the head, the
    last K blocks and the final norm / pooler; chapter 6 of the book uses last_blocks:1)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters on a frozen model.init_from (`train.lora.rank=8`); see LoRAConfig."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward and recompute the block in the backward:
    less activation memory for about one more forward pass of compute."""
    best_metric: BestMetric = "auto"
    """Which validation metric picks the best checkpoint; auto: val_accuracy for classify (val_rmse
    on a regression folder), val_loss otherwise."""
    loss_on: Literal["responses", "all"] = "responses"
    """dialogue: which tokens are learned: the replies only (user turns get -100), or all
    tokens of the dialogue, user turns too (as GPT2-chitchat does)."""
    loggers: list[str] = field(default_factory=list)
    """Experiment trackers fed beside metrics.jsonl and the console (rank 0 only): tensorboard,
    wandb, mlflow, or your own class as "package.module:Class" (see lmforge.train.trackers).
    They write under the run folder (tensorboard/, wandb/, mlflow.db + mlruns/) unless their
    own environment variables point elsewhere; one that fails is a warning, never a lost run."""
    eval_at_start: bool = False
    """Evaluate once before the first step: the untrained model's validation loss at step 0
    (logged and tracked; the untrained model is the first candidate for the best checkpoint)."""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        errors: list[str] = []
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_every",
                     "eval_batches", "keep_epochs", "max_non_finite"):
            _check(errors, getattr(self, name) > 0, f"train.{name}", "must be a positive integer")
        for name in ("max_steps", "save_every", "patience"):
            value = getattr(self, name)
            _check(errors, value is None or value > 0, f"train.{name}", "must be positive or null")
        _check(errors, self.lr > 0, "train.lr", "must be positive")
        _check(errors, 0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(errors, self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(errors, 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(errors, self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(errors, self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be positive or null")
        _check(errors, self.max_time is None or self.max_time > 0, "train.max_time", "must be positive or null")
        _check(errors, self.peak_flops is None or self.peak_flops > 0, "train.peak_flops",
               "must be positive (FLOP/s) or null")
        _check(errors, self.collective_timeout > 0, "train.collective_timeout", "must be positive")
        _check(errors, self.sample_tokens >= 0, "train.sample_tokens", "must be >= 0")
        _check(errors, re.fullmatch(r"all|head|last_blocks:\d+", self.trainable) is not None,
               "train.trainable", f"{self.trainable!r}: choose all, head or last_blocks:K (e.g. last_blocks:1)")
        for i, name in enumerate(self.loggers):
            _check(errors, name in TRACKERS or re.fullmatch(r"[\w.]+:\w+", name) is not None, f"train.loggers[{i}]",
                   f"{name!r} is not one of {', '.join(TRACKERS)} nor a class as package.module:Class"
                   + "".join(f"; did you mean {near!r}?" for near in difflib.get_close_matches(name, TRACKERS, 1)))
        _check(errors, self.lora.rank == 0 or self.trainable == "all", "train.trainable",
               f"{self.trainable!r} with train.lora: the adapters are what trains; list modules to train "
               "in full in train.lora.trainable")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """The run folder's name, one folder (not a path): the run is written to out_dir/name."""
    out_dir: str = "runs"
    """Where run folders are created."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, _plain_folder_name(self.name), "run.name",
               f"{self.name!r}: must be one folder name, made inside run.out_dir ({self.out_dir}); a path "
               "(with /, \\, . or ..) would put the run elsewhere; choose where runs go with run.out_dir")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FieldErrors(ValueError):
    """The problems a section's `__post_init__` found, each `dotted.key: message`."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise FieldErrors(errors)


def _check(errors: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        errors.append(f"{key}: {message}")


def non_finite_message(value: Any) -> str:
    return f"must be a finite number, got {value!r}"


def _check_finite(section: Any, name: str) -> None:
    """Refuse inf and NaN in every float field at once: they pass `> 0` style range checks (inf)
    or make them fail with a misleading message (NaN), then poison the run."""
    errors: list[str] = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{name}.{f.name}: {non_finite_message(value)}")
    _raise_if(errors)


def _plain_folder_name(name: str) -> bool:
    """One path component that stays inside its parent: no separator, not `.` or `..`."""
    return bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0")
