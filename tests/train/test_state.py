"""The stateful parts of a checkpoint's training state: each saves and restores only itself."""

from __future__ import annotations

import torch

from lmforge.train.data_order import DataPosition, epoch_permutation
from lmforge.train.state import LoopState, RngState, upgrade_training_state


def test_loop_state_round_trips_with_its_data_position_in_one_flat_dict():
    state = LoopState(step=7, tokens=700, examples=56, best_val_loss=2.5, micro_split=2,
                      position=DataPosition(epoch=1, epoch_sample=24))
    saved = state.state_dict()
    assert saved["step"] == 7 and saved["epoch"] == 1 and saved["epoch_sample"] == 24 and "position" not in saved
    restored = LoopState()
    restored.load_state_dict(saved)
    assert restored == state


def test_the_data_position_turns_the_epoch_when_a_full_window_no_longer_fits():
    position = DataPosition(epoch=0, epoch_sample=8)
    assert not position.turn_epoch_if_done(window=4, num_samples=13)  # 8 + 4 <= 13: one more window
    assert position.epochs(13) == round(8 / 13, 4)
    position.epoch_sample = 12
    assert position.turn_epoch_if_done(window=4, num_samples=13)  # the last sample is left out
    assert (position.epoch, position.epoch_sample) == (1, 0)


def test_rng_state_restores_the_draws():
    rng = RngState(torch.device("cpu"))
    saved = rng.state_dict()
    first = torch.rand(3)
    rng.load_state_dict(saved)
    assert torch.equal(torch.rand(3), first)


def test_a_training_state_with_the_flat_rng_keys_of_earlier_versions_still_loads():
    old = {"loop": {}, "rng_torch": torch.get_rng_state()}
    assert torch.equal(upgrade_training_state(old)["rng"]["torch"], old["rng_torch"])
    new = {"loop": {}, "rng": {"torch": torch.get_rng_state()}}
    assert upgrade_training_state(new) is new


def test_an_epoch_s_order_is_drawn_once_and_is_the_seeded_permutation():
    first = epoch_permutation(1000, 7, 2)
    assert epoch_permutation(1000, 7, 2) is first  # every step of the epoch reads the same tensor
    assert torch.equal(first, torch.randperm(1000, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2)))
    following = epoch_permutation(1000, 7, 3)
    assert not torch.equal(following, first) and sorted(following.tolist()) == list(range(1000))
    assert torch.equal(epoch_permutation(1000, 7, 2), first)  # drawn again: the same order
