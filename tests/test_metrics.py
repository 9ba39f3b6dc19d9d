import math

import torch

from lmforge.base.metrics import perplexity, shift_labels, token_accuracy


def test_token_accuracy_shifts_and_ignores_padding():
    # vocab 4; logits at t predict label t+1
    predictions = torch.tensor([[1, 2, 3, 0], [2, 2, 0, 0]])
    logits = torch.nn.functional.one_hot(predictions, 4).float()
    labels = torch.tensor([[0, 1, 2, 1], [3, 2, -100, -100]])
    # row 0 targets 1,2,1 vs predictions 1,2,3 -> 2 right; row 1 target 2 vs prediction 2 -> 1 right
    assert token_accuracy(logits, labels) == 3 / 4


def test_shift_labels_pads_the_last_position():
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


def test_perplexity_is_capped():
    assert perplexity(math.log(20.0)) == 20.0 or abs(perplexity(math.log(20.0)) - 20.0) < 1e-9
    assert math.isfinite(perplexity(1e9))
