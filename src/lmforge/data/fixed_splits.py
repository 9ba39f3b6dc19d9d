"""Fixed splits: the validation and test sets a user already has (`prepare --val FILE... --test
FILE...`), kept as they are instead of being merged with the inputs and drawn again, so numbers
measured on them compare with published ones.

Owns the plan every task's preparation follows (`plan_splits`):

- every document (sample, dialogue, labelled text) of a `--val` file goes to val, of a `--test`
  file to test, in reading order; the inputs are drawn as before, but only for the splits not
  given as files (their fraction is 0), so `--val` alone makes every input document train;
- a file given twice (an input that is also a val or test file, or one file in both) is refused
  by name, compared by resolved path and by identity on disk;
- a fixed split that comes out empty is an error naming its files (`check_fixed_splits`);
- meta.json says where each split came from (`split_sources`: the files, or the fraction drawn).

Fixed files come after the inputs in reading order (inputs, then val files, then test files), so the
draws over the inputs are those of a prepare without fixed splits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from lmforge.base.readers import check_inputs
from lmforge.data.pipeline import Splitter

FIXED = ("val", "test")


class SplitPlan(NamedTuple):
    inputs: list[Path]  # drawn into train (and val / test when not fixed)
    fixed: dict[str, list[Path]]  # "val" / "test" -> files whose every sample lands there
    val_fraction: float  # of the inputs drawn into val (0 when val is fixed)
    test_fraction: float

    @property
    def paths(self) -> list[Path]:
        """Every file in reading order: the inputs, then the val files, then the test files."""
        return self.inputs + [p for s in FIXED for p in self.fixed.get(s, [])]

    def split_names(self) -> list[str]:
        """train and val always, test when drawn or given."""
        return ["train", "val"] + (["test"] if self.test_fraction > 0 or "test" in self.fixed else [])

    def splitter(self, seed: int) -> FixedSplitter:
        return FixedSplitter(self, seed)

    def split_of(self, path: Path) -> str | None:
        """The fixed split of a file, or None for an input (drawn)."""
        for split, files in self.fixed.items():
            if any(Path(path) == f for f in files):
                return split
        return None

    def sources(self) -> dict[str, dict]:
        """Where each split came from, for meta.json: {"files": [...]} or {"drawn": fraction}."""
        drawn = {"val": self.val_fraction, "test": self.test_fraction}
        out = {"train": {"drawn": round(1.0 - self.val_fraction - self.test_fraction, 12)}}
        for split in self.split_names()[1:]:
            files = self.fixed.get(split)
            out[split] = {"files": [str(p.resolve()) for p in files]} if files else {"drawn": drawn[split]}
        return out


class FixedSplitter:
    """The split of each document in reading order: a fixed file's split, else the seeded draw."""

    def __init__(self, plan: SplitPlan, seed: int) -> None:
        self._fixed = {path: split for split, files in plan.fixed.items() for path in files}
        self._draw = Splitter(seed, plan.val_fraction, plan.test_fraction)

    def next(self, path: Path) -> str:
        return self._fixed.get(path) or self._draw.next()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def plan_splits(inputs: Sequence[Path], val_files: Sequence[Path] | None, test_files: Sequence[Path] | None,
                val_fraction: float, test_fraction: float, *, check_format: bool = True) -> SplitPlan:
    """The files checked (globs expanded, `lmforge.base.readers.check_inputs`) and what goes where;
    ValueError naming a file given twice."""
    paths = check_inputs(inputs, check_format=check_format)
    fixed: dict[str, list[Path]] = {}
    for split, files in (("val", val_files), ("test", test_files)):
        if files:
            fixed[split] = check_inputs(files, check_format=check_format)
    groups = [("--input", paths), *((f"--{s}", fixed[s]) for s in FIXED if s in fixed)]
    for i, (flag_a, group_a) in enumerate(groups):
        for flag_b, group_b in groups[i:]:
            for k, a in enumerate(group_a):
                others = group_b[k + 1:] if group_b is group_a else group_b
                twice = next((b for b in others if _same_file(a, b)), None)
                if twice is not None:
                    where = f"twice in {flag_a}" if flag_a == flag_b else f"both in {flag_a} and in {flag_b}"
                    raise ValueError(f"{a}: given {where}; a file belongs to one split only (the fixed splits "
                                     "keep their files whole, the inputs are drawn)")
    return SplitPlan(paths, fixed, 0.0 if "val" in fixed else val_fraction,
                     0.0 if "test" in fixed else test_fraction)


def check_fixed_splits(plan: SplitPlan, counts: dict[str, dict], unit: str, key: str = "samples") -> None:
    """ValueError naming the files of a fixed split that holds no `key`."""
    for split, files in plan.fixed.items():
        if counts[split][key] == 0:
            raise ValueError(f"--{split} {', '.join(map(str, files))}: no {unit} in the {split} file(s); "
                             f"give {split} files that hold {unit}")
