"""The console line: the task's own throughput unit in place of tok/s, MFU and ETA kept."""

from lmforge.train.log import format_train_line, throughput_extra


def test_lm_line_shows_tokens_per_second():
    line = format_train_line(25, 1172, 0.15, 6.7792, 0.105, 1e-3, 14076.4, 0.573, 166.0)
    assert line == "step 25/1172 | epoch 0.15 | loss 6.7792 | acc 10.5% | lr 1.00e-03 | 14,076 tok/s | MFU 57.3% | ETA 2m46s"


def test_a_task_unit_replaces_tok_per_second():
    metrics = {"ex_per_s": 1234.4, "loss": 0.5}
    assert throughput_extra("ex", metrics) == {"ex/s": 1234.4}
    assert throughput_extra("ex", {"loss": 0.5}) == {}  # eval results carry no rate
    line = format_train_line(4, 10, 1.0, 0.5, 0.9, 1e-3, 50_000.0, 0.2, 30.0, throughput_extra("ex", metrics))
    assert line == "step 4/10 | epoch 1.00 | loss 0.5000 | acc 90.0% | lr 1.00e-03 | 1,234 ex/s | MFU 20.0% | ETA 0m30s"
    extras = {"mlm": 7.0, "nsp": 0.69, **throughput_extra("pairs", {"pairs_per_s": 42.25})}
    line = format_train_line(4, 10, 1.0, 7.7, None, 1e-3, 900.0, None, 30.0, extras)
    assert line == "step 4/10 | epoch 1.00 | loss 7.7000 | mlm 7.0000 | nsp 0.6900 | lr 1.00e-03 | 42.2 pairs/s | ETA 0m30s"
