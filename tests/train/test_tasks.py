"""The loop's contract with the tasks: `Task` names its required members and its optional hooks,
and every registered task class satisfies it."""

from __future__ import annotations

import inspect

import pytest

from lmforge.train.tasks import TASKS, Task, task_class

REQUIRED = {"name", "throughput_unit", "dataset", "collate", "count_targets", "count_tokens",
            "loss_and_metrics", "summarize"}
OPTIONAL = {"best_metric", "eval_train", "reports_perplexity", "model_types", "prepare_model", "start_epoch",
            "console_extras", "samples", "final_report"}


def test_the_protocol_lists_required_members_and_optional_hooks_with_defaults():
    members = {n for n in vars(Task) if not n.startswith("_")} | set(Task.__annotations__)
    assert members == REQUIRED | OPTIONAL
    assert Task.__abstractmethods__ == REQUIRED - {"name", "throughput_unit"}
    assert all(hasattr(Task, hook) for hook in OPTIONAL)  # each optional hook has its default
    assert not any(hasattr(Task, attr) for attr in ("name", "throughput_unit"))  # no default: a task says


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_class_satisfies_the_protocol(name: str):
    cls = task_class(name)
    assert not cls.__abstractmethods__, f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} out"
    assert cls.name == name and isinstance(cls.throughput_unit, str)
    assert isinstance(cls.__new__(cls), Task)
    for member in REQUIRED | OPTIONAL:
        theirs, ours = getattr(cls, member), getattr(Task, member, None)
        if inspect.isfunction(ours):
            assert len(inspect.signature(theirs).parameters) == len(inspect.signature(ours).parameters), member
        elif ours is not None:
            assert type(theirs) is type(ours), member
