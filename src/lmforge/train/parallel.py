"""The model across processes: DDP / FSDP wrapping, gradient-sync control, and state dicts that
are the same whatever the world size (full weights, a name-keyed optimizer state).

Process-group set-up and the host-side reductions live in lmforge.base.distributed; one process
runs the same code with the model left unwrapped.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from lmforge.base.runtime import Runtime
from lmforge.models.registry import load_weights, model_from_architecture
from lmforge.ops.torch_private import compiled_original

FSDP_MIN_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard (FSDP2) is public from 2.6


def check_strategy(strategy: str) -> None:
    """Refuse, before any work, a strategy this torch cannot run (whatever the world size, so a
    config that would fail under torchrun fails alike in one process)."""
    if strategy != "fsdp":
        return
    torch_version = torch.__version__
    found = re.match(r"(\d+)\.(\d+)", torch_version)
    if found is None or (int(found[1]), int(found[2])) < FSDP_MIN_TORCH:
        need = ".".join(map(str, FSDP_MIN_TORCH))
        raise ValueError(f"train.strategy=fsdp needs torch >= {need} (fully_shard), but torch {torch_version} "
                         f"is installed; upgrade torch or use train.strategy=ddp")


def wrap_model(model: nn.Module, strategy: str, device: torch.device, world_size: int) -> nn.Module:
    """DDP (a full replica per rank) or FSDP (parameters sharded per block); unchanged alone."""
    if world_size == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for module_list in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in module_list:
                fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: no wrapper)."""
    model = compiled_original(model)
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation window."""
    if enabled:
        return contextlib.nullcontext()
    # Attribute checks, not isinstance: under torch.compile the wrapper forwards them to DDP / FSDP.
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on CPU; a collective under FSDP, so every rank calls it."""
    if world_size == 1 or not _is_fsdp(model):
        return {k: v.detach() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def model_from_weights(arch: dict, weights: dict[str, torch.Tensor], device: torch.device,
                       what: str = "the trained model") -> nn.Module:
    """A new model of architecture `arch` holding `weights` (already in memory), on `device`."""
    model = model_from_architecture(arch)
    load_weights(model, weights, what)
    return model.to(device)


def plain_model(model: nn.Module, arch: dict, rt: Runtime) -> nn.Module | None:
    """The trained model as one ordinary module on rank 0 (for generation and reports), None on
    the others; a collective with several processes (FSDP gathers its shards): every rank calls it."""
    if rt.world_size == 1:
        return unwrap(model)
    weights = full_model_state(model, rt.world_size)
    return model_from_weights(arch, weights, rt.device) if rt.is_main else None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter names, the same whatever the world size.

    Before the first step there is no state, and it is saved empty: torch's state-dict helper
    would first create one with a step on zero gradients, so every step count would start at 1
    and the first real update (its bias correction) would differ from a run that never saved."""
    if not optimizer.state:  # the same on every rank: all of them step together
        return {"state": {}, "param_groups": _named_groups(model, optimizer)}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap_for_state(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `full_optimizer_state`; a parameter it holds no state for has none
    afterwards (as in the run that saved it), whatever torch's loader created for it."""
    if not state.get("state"):  # saved before the first step: the hyperparameters alone
        groups = _indexed_groups(model, optimizer, state.get("param_groups", []))
        optimizer.load_state_dict({"state": {}, "param_groups": groups})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap_for_state(model), optimizer, state,  # not strict: some may have no state
                             options=StateDictOptions(full_state_dict=True, strict=False))
    for name, param in unwrap_for_state(model).named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(param, None)


def _named_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's parameter groups as its state dict has them, parameters by name."""
    names = {param: name for name, param in unwrap_for_state(model).named_parameters()}
    saved = optimizer.state_dict()["param_groups"]
    return [{**group, "params": [names[p] for p in live["params"]]}
            for group, live in zip(saved, optimizer.param_groups)]


def _indexed_groups(model: nn.Module, optimizer: torch.optim.Optimizer, saved: list[dict]) -> list[dict]:
    """Saved parameter groups (parameters by name) with the indices this optimizer's state dict
    uses, after checking that every group holds the same parameters."""
    current = _named_groups(model, optimizer)
    if len(saved) != len(current):
        raise ValueError(f"optimizer state: {len(saved)} parameter groups saved, the optimizer has {len(current)}")
    indices = optimizer.state_dict()["param_groups"]
    for i, (group, now) in enumerate(zip(saved, current)):
        missing, extra = set(group["params"]) - set(now["params"]), set(now["params"]) - set(group["params"])
        if missing or extra:
            raise ValueError(f"optimizer state: parameter group {i} was saved with parameters this model does "
                             f"not train ({', '.join(sorted(missing)) or 'none'}) and without some it trains "
                             f"({', '.join(sorted(extra)) or 'none'})")
    return [{**group, "params": ids["params"]} for group, ids in zip(saved, indices)]


class NamedOptimizerState:
    """The optimizer as a stateful part of a checkpoint: its state keyed by parameter names, so
    a run saved with N processes (DDP or FSDP) resumes with M. A collective under FSDP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return full_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.model, self.optimizer, state)


def unwrap_for_state(model: nn.Module) -> nn.Module:
    """DDP's inner module (names without `module.`); FSDP modules are used as they are."""
    return model if _is_fsdp(model) else unwrap(model)


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in [unwrap(model)])
