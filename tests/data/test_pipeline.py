"""The shared preparation steps: seeded split draws, wanted splits, checks before any work."""

from collections import Counter

import pytest

from lmforge.data.pipeline import Splitter, check_numbers, check_out_dir, split_names, wanted_splits


def test_split_draws_are_seeded_and_follow_the_fractions():
    a, b = Splitter(7, 0.1, 0.2), Splitter(7, 0.1, 0.2)
    draws = [a.next() for _ in range(10_000)]  # crosses block edges
    assert draws == [b.next() for _ in range(10_000)]
    counts = Counter(draws)
    assert set(counts) == {"train", "val", "test"}
    assert abs(counts["val"] / 10_000 - 0.1) < 0.02 and abs(counts["test"] / 10_000 - 0.2) < 0.02
    no_test = Splitter(1, 0.3, 0.0)
    assert {no_test.next() for _ in range(200)} == {"train", "val"}


def test_split_names_and_wanted_splits():
    assert split_names(0.0) == ["train", "val"] and split_names(0.1) == ["train", "val", "test"]
    assert wanted_splits(0.0, 0.2) == ["train", "test"]
    assert wanted_splits(0.1, 0.0) == ["train", "val"]


def test_checks_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        check_numbers(1.0, 0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        check_numbers(0.1, 0.0, batch_size=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        check_numbers(0.1, 0.0, workers=0)
    out = tmp_path / "out"
    (out / "in.txt").parent.mkdir()
    (out / "in.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        check_out_dir(out, [], overwrite=False)
    with pytest.raises(ValueError, match="holds the input"):
        check_out_dir(out, [out / "in.txt"], overwrite=True)
    assert check_out_dir(str(tmp_path / "new"), [], overwrite=False) == tmp_path / "new"
