"""Checks shared by the architecture configs (GPTConfig, BertConfig) when read from a dict."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any


def checked_fields(cls: type, d: dict[str, Any], model_type: str, label: str) -> dict[str, Any]:
    """`d` (a config.json) without its "model_type" key, refusing another model type and unknown
    keys (each with its nearest valid key)."""
    d = dict(d)
    found = d.pop("model_type", model_type)
    if found != model_type:
        raise ValueError(f"model_type={found!r}: {cls.__name__} needs model_type {model_type!r}")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(f"unknown {label} config key(s): {', '.join(hints)}; valid keys: {', '.join(valid)}")
    return d
