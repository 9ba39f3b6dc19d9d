"""What a resumed run checks before it goes on: whether it had already finished (then nothing
is done and nothing written), and whether its data changed since the checkpoint (said, and a
saved position past the end of fewer samples starts the next epoch).

The data a run trains on is recorded in every checkpoint (`lmforge.train.state.DataIdentity`:
meta.json's content hash, the training and validation samples); the end of a run is its `end`
event in metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.base.config import TrainConfig
from lmforge.train.data_order import DataPosition
from lmforge.train.log import last_end
from lmforge.train.state import DataIdentity


def reached_its_end(run_dir: Path, step: int, total_steps: int) -> bool:
    """Whether a run resumed at `step` had reached its length and closed normally (its last end
    event is at that step): finished, unless train.max_steps or train.epochs were raised."""
    end = last_end(run_dir)
    return (step >= total_steps and end is not None and end.get("step") == step
            and end.get("reason") not in ("signal", "non_finite"))


def finished_detail(train: TrainConfig, run_dir: Path, step: int, total_steps: int) -> str:
    """What to tell the user who resumed a finished run, with the command that goes further."""
    key, length, more = (("train.max_steps", train.max_steps, 2 * train.max_steps) if train.max_steps
                         else ("train.epochs", train.epochs, train.epochs + 1))
    return (f"{run_dir} is finished: it reached step {step} of {total_steps} ({key}={length}); nothing was "
            f"changed. To train it further, raise {key}: `lmforge train --resume {run_dir} {key}={more}`")


def resumed_data_lines(data: DataIdentity, position: DataPosition, window: int, train_samples: int,
                       data_dir: Path) -> list[str]:
    """Lines for the log: what changed in the data since the checkpoint. A saved position that
    leaves no full window of `window` samples (fewer of them, or a larger window) is moved to
    the start of the next epoch, and said."""
    changes = data.changes()
    saved = f"epoch {position.epoch}, sample {position.epoch_sample:,}"
    moved = position.turn_epoch_if_done(window, train_samples)
    where = (f"; the saved position ({saved}) is past its last full step, so the run goes on from epoch "
             f"{position.epoch}" if moved else "")
    if changes:
        return [f"warning: the data in {data_dir} changed since the checkpoint ({'; '.join(changes)}); the run "
                f"goes on with the data as it is now{where}"]
    return [f"note: {train_samples:,} training samples in steps of {window}{where}"] if moved else []
