"""Every private torch hook lmforge uses is still where it was, in the installed torch.

Each failure names the hook, the torch version and what lmforge loses without it, so a torch
upgrade that moves one fails here, by name, rather than as a slow start or a wrong update.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import Optimizer

from lmforge.ops.torch_private import (clear_step_inputs, compiled_original, set_found_inf, set_grad_scale,
                                       unguarded)


def moved(hook: str, problem: str, consequence: str) -> str:
    return (f"torch {torch.__version__}: the private hook {hook} {problem}; {consequence}. "
            "Update src/lmforge/ops/torch_private.py (and its callers) for this torch.")


@pytest.mark.parametrize("owner, name", [(Optimizer, "zero_grad"), (Optimizer, "add_param_group"),
                                         (Optimizer, "state_dict"), (Optimizer, "load_state_dict"),
                                         (torch.optim.AdamW, "step")])
def test_optimizer_methods_still_wrap_a_plain_function(owner, name):
    method = getattr(owner, name)
    hook = f"{owner.__name__}.{name}.__wrapped__"
    assert hasattr(method, "__wrapped__"), moved(
        hook, "is gone (torch no longer wraps the method in torch._disable_dynamo / a graph break)",
        "lmforge.train.optim.AdamW would call the guarded method and import torch._dynamo at start-up")
    plain = unguarded(method)
    assert plain is not method and plain.__module__.startswith("torch.optim"), moved(
        hook, f"leads to {plain.__module__}.{plain.__qualname__}, not torch.optim's own method",
        "lmforge.train.optim.AdamW may skip part of the optimizer")


def _one_step(grad: list[float], grad_scale: float | None = None, found_inf: float | None = None) -> torch.Tensor:
    """The weights after one fused AdamW step from ones with `grad` (eps 1: the update depends on
    the gradient's size, so a gradient left unscaled shows)."""
    weight = torch.nn.Parameter(torch.ones(len(grad)))
    try:
        optimizer = torch.optim.AdamW([weight], lr=0.1, eps=1.0, fused=True)
    except (RuntimeError, ValueError):
        pytest.skip(f"torch {torch.__version__} has no fused AdamW on the CPU (lmforge then clips on its own)")
    weight.grad = torch.tensor(grad)
    if grad_scale is not None:
        set_grad_scale(optimizer, torch.tensor(grad_scale))
    if found_inf is not None:
        set_found_inf(optimizer, torch.tensor(found_inf))
    optimizer.step()
    clear_step_inputs(optimizer)
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    return weight.detach()


GRAD = [1.0, -2.0, 3.0, -4.0]


def test_fused_adamw_still_reads_grad_scale():
    scaled, halved = _one_step(GRAD, grad_scale=2.0), _one_step([g / 2 for g in GRAD])
    assert torch.equal(scaled, halved) and not torch.equal(scaled, _one_step(GRAD)), moved(
        "optimizer.grad_scale (read by the fused AdamW step)", "no longer divides the gradients",
        "gradient clipping that rides on the step (train/update.py) would not clip")


def test_fused_adamw_still_reads_found_inf():
    assert torch.equal(_one_step(GRAD, found_inf=1.0), torch.ones(4)), moved(
        "optimizer.found_inf (read by the fused AdamW step)", "no longer skips the update",
        "a non-finite step on a GPU would update the weights (train/update.py device_update)")
    assert not torch.equal(_one_step(GRAD, found_inf=0.0), torch.ones(4))


@pytest.mark.parametrize("probe", ["_is_amx_tile_supported", "_is_avx512_bf16_supported"])
def test_cpu_bf16_probes_are_still_there(probe):
    assert callable(getattr(torch.cpu, probe, None)), moved(
        f"torch.cpu.{probe}", "is gone", "base/runtime.py cpu_bf16_units can no longer tell that bf16 is fast here")
    assert isinstance(getattr(torch.cpu, probe)(), bool)


def test_compiled_module_still_keeps_the_original_as_orig_mod():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)  # not run: wrapping compiles nothing
    assert compiled_original(compiled) is model, moved(
        "torch.compile(model)._orig_mod", "is gone",
        "train/parallel.py unwrap would save compiled models under `_orig_mod.` names")
    assert compiled_original(model) is model
