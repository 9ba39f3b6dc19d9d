"""The nanoGPT peer of bench/ (bench/nanogpt_peer.py): the settings it passes are ones nanoGPT's
train.py accepts, its log is read as train.py writes it, and its data folder is what train.py
reads. The benchmarks themselves are run by `make bench`, never by the tests."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import nanogpt_peer  # noqa: E402  (bench/ is not a package)

needs_nanogpt = pytest.mark.skipif(not nanogpt_peer.available(), reason=nanogpt_peer.ABSENT)


def _train_py_globals() -> dict:
    """train.py's configurable globals and their values, as its configurator checks them."""
    tree = ast.parse((nanogpt_peer.NANOGPT / "train.py").read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.body if isinstance(node.value, ast.IfExp) else node.value  # dtype = a if .. else b
            try:  # constants and arithmetic on them (5 * 8); names and calls are not configurable values
                found[node.targets[0].id] = eval(compile(ast.Expression(value), "train.py", "eval"),
                                                 {"__builtins__": {}})
            except (NameError, TypeError, AttributeError):
                pass
    return found


@needs_nanogpt
def test_every_setting_is_a_train_py_key_of_the_same_type():
    known = _train_py_globals()
    args = nanogpt_peer.train_py_args({"n_layer": 2, "n_head": 2, "n_embd": 64, "context": 32}, 4, 5)
    for arg in args:
        key, value = arg[2:].split("=", 1)
        assert key in known, key
        try:
            parsed = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            parsed = value
        assert type(parsed) is type(known[key]), (key, value)  # train.py's configurator asserts this
    assert "--max_iters=4" in args  # train.py runs iterations 0 .. max_iters


def test_iteration_times_are_read_from_the_log():
    log = ("step 0: train loss 9.0112, val loss 9.0086\n"
           "iter 0: loss 9.0250, time 1520.31ms, mfu -100.00%\n"
           "iter 1: loss 8.8, time 250.50ms, mfu -100.00%\n"
           "iter 2: loss nan, time 249.00ms, mfu 12.50%\n")
    assert nanogpt_peer.parse_iter_times(log) == pytest.approx([1.52031, 0.2505, 0.249])


@needs_nanogpt
def test_the_folder_holds_the_token_stream_and_vocabulary_train_py_reads(lm_data, tmp_path):
    import pickle

    work = nanogpt_peer.nanogpt_folder(lm_data, 384, tmp_path)
    stream = np.memmap(work / "data" / "lmforge" / "train.bin", dtype=np.uint16, mode="r")
    assert np.array_equal(stream, np.fromfile(lm_data / "train.bin", dtype=np.uint16))
    with open(work / "data" / "lmforge" / "meta.pkl", "rb") as f:
        assert pickle.load(f) == {"vocab_size": 384}  # written by the test itself a line above
    assert (work / "train.py").resolve() == (nanogpt_peer.NANOGPT / "train.py").resolve()
    assert json.loads((lm_data / "meta.json").read_text())["dtype"] == "uint16"
