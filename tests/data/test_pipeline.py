"""The shared preparation steps: seeded split draws, wanted splits, checks before any work."""

from collections import Counter

import pytest

from lmforge.data.pipeline import (Splitter, check_numbers, check_wanted_splits, split_names, wanted_splits,
                                   writing_folder)


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
    with pytest.raises(ValueError, match=r"not empty; choose another folder, or pass --overwrite \(overwrite=True\)"):
        with writing_folder(out, [], overwrite=False):
            pass
    with pytest.raises(ValueError, match="contains the input"):
        with writing_folder(out, [out / "in.txt"], overwrite=True):
            pass
    assert (out / "in.txt").exists()
    with writing_folder(str(tmp_path / "new"), [], overwrite=False) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert (tmp_path / "new" / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no temp folder, no lock left


def test_an_empty_wanted_split_names_the_counts_and_the_fix():
    counts = {"train": {"samples": 4}, "val": {"samples": 0}, "test": {"samples": 0}}
    check_wanted_splits(counts, 0.0, 0.0, [], "texts")
    with pytest.raises(ValueError, match=r"the val split is empty \(texts: train 4, val 0, test 0\); "
                                         r"give more data or a larger --val-fraction \(now 0.1\)"):
        check_wanted_splits(counts, 0.1, 0.2, [], "texts")
