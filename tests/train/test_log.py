"""The console line: the task's own throughput unit in place of tok/s, MFU and ETA kept."""

from lmforge.train.log import format_train_line, throughput


def test_lm_line_shows_tokens_per_second():
    line = format_train_line(25, 1172, 0.15, 6.7792, 0.105, 1e-3, 14076.4, 0.573, 166.0)
    assert line == "step 25/1172 | epoch 0.15 | loss 6.7792 | acc 10.5% | lr 1.00e-03 | 14,076 tok/s | MFU 57.3% | ETA 2m46s"


def test_a_task_unit_replaces_tok_per_second():
    rates = throughput("ex", tokens=50_000.0, samples=1234.4, seconds=1.0)
    assert rates == {"tokens_per_s": 50_000.0, "ex_per_s": 1234.4}
    assert throughput("tok", tokens=50_000.0, samples=1234.4, seconds=1.0) == {"tokens_per_s": 50_000.0}
    line = format_train_line(4, 10, 1.0, 0.5, 0.9, 1e-3, rates["ex_per_s"], 0.2, 30.0, unit="ex")
    assert line == "step 4/10 | epoch 1.00 | loss 0.5000 | acc 90.0% | lr 1.00e-03 | 1,234 ex/s | MFU 20.0% | ETA 0m30s"
    extras = {"mlm": 7.0, "nsp": 0.69}
    line = format_train_line(4, 10, 1.0, 7.7, None, 1e-3, 42.25, None, 30.0, extras, unit="pairs")
    assert line == "step 4/10 | epoch 1.00 | loss 7.7000 | mlm 7.0000 | nsp 0.6900 | lr 1.00e-03 | 42.2 pairs/s | ETA 0m30s"


def test_a_gpu_line_shows_allocated_and_peak_memory_and_a_cpu_run_has_none():
    import torch

    from lmforge.train.log import device_memory

    memory = {"memory_allocated_gib": 1.214, "memory_peak_gib": 3.4}
    line = format_train_line(4, 10, 1.0, 0.5, 0.9, 1e-3, 1000.0, 0.2, 30.0, memory=memory)
    assert line.endswith(" | MFU 20.0% | mem 1.21/3.40 GiB | ETA 0m30s")
    assert device_memory(torch.device("cpu")) == {}


def test_train_log_lines_start_with_the_clock_time(tmp_path):
    from lmforge.train.log import CLOCK, RunLogger, without_clock

    log = RunLogger(tmp_path, quiet=True)
    log.line("step 1/2 | loss 3.0")
    log.note("--- sample ---\nROMEO:\nto be")
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert all(CLOCK.match(line) for line in lines[:2]) and lines[2:] == ["ROMEO:", "to be"]
    assert [without_clock(line) for line in lines[:2]] == ["step 1/2 | loss 3.0", "--- sample ---"]
