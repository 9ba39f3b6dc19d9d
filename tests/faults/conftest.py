"""The fault suite's common fixtures: a tiny prepared data folder and an uninterrupted baseline run."""

from __future__ import annotations

from pathlib import Path

import pytest

import faultkit as fk


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fk.tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return fk.baseline(tmp_path_factory)
