# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned for the test environment; users get the range in pyproject.toml.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-slow faults install install-test clean bench bench-train bench-generate bench-prepare bench-bert bench-startup bench-lm-head bench-dialogue bench-breakdown bench-serve \
	bench-scale bench-prepare-scale gpu-check bench-lora bench-checkpointing bench-lora-spam

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e .
	$(BIN)/lmforge kernels  # builds lmforge's CPU kernels once (~15 s); torch's ops if that fails
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

# The chat page's test drives Debian's chromium through its chromedriver (tests/serve/test_browser.py).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(VENV)/.chromium: $(BIN)/python
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/lmforge quickstart

# The fault suite (tests/faults) runs inside `make test` once, with its scoreboard lines.
FAULTS_PLUGIN := PYTHONPATH=tests/faults$${PYTHONPATH:+:$$PYTHONPATH}
test: $(VENV)/.installed-test $(VENV)/.chromium
	HF_HUB_OFFLINE=1 $(FAULTS_PLUGIN) $(BIN)/python -m pytest -q -p faults_scoreboard tests

# Crashes, kills, signals, full disks, damaged checkpoints and bad inputs: one line per scenario.
faults: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(FAULTS_PLUGIN) $(BIN)/python -m pytest -q -p faults_scoreboard tests/faults

# The slow tests also run W&B (offline) and MLflow (a local store) as train.loggers.
$(VENV)/.installed-trackers: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e '.[test,wandb,mlflow]' $(TORCH_PIN)
	touch $@

test-slow: $(VENV)/.installed-trackers
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow tests/slow

# Benchmarks against transformers on the issue's fixed workload, interleaved rounds (bench/*.py
# say what each measures; BENCH_ROUNDS=3 by default). `make bench` runs all of them (~25 min on
# 2 cores) and ends with the tables, also kept in runs/bench/*.md.
BENCH_RUN := HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $(BIN)/python
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]' $(TORCH_PIN)
	touch $@

bench: bench-train bench-generate bench-llama-train bench-llama-generate bench-prepare bench-bert bench-startup bench-lm-head bench-dialogue bench-breakdown \
       bench-scale bench-lora bench-checkpointing bench-lora-spam
	@cat runs/bench/train.md runs/bench/generate.md runs/bench/llama_train.md runs/bench/llama_generate.md runs/bench/prepare.md runs/bench/bert.md runs/bench/startup.md \
	     runs/bench/lm_head.md runs/bench/dialogue.md runs/bench/step_breakdown.md runs/bench/scale.md \
	     runs/bench/lora.md runs/bench/checkpointing.md runs/bench/lora_spam.md

bench-train: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/train.py

bench-generate: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/generate.py

# The same two races on a Llama-class model of the workload's shape (2 key/value heads).
.PHONY: bench-llama-train bench-llama-generate
bench-llama-train: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/llama_train.py

bench-llama-generate: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/llama_generate.py

bench-prepare: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/prepare.py

bench-bert: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/bert.py

bench-startup: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/startup.py

bench-lm-head: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/lm_head.py

bench-dialogue: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/dialogue.py

# LoRA rank 8 on the dialogue workload against transformers + peft with the Trainer (tokens/s, peak memory).
bench-lora: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/lora.py

# Activation checkpointing on the gpt2 preset: step time and peak memory with and without.
bench-checkpointing: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/checkpointing.py

# SMS spam with the imported all-MiniLM-L6-v2: LoRA rank 8 against full fine-tuning (accuracy, time).
bench-lora-spam: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/lora_spam.py

bench-serve: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/serve.py

# Not a comparison of rates: where each side's training step spends its time, operator by operator.
bench-breakdown: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/step_breakdown.py

# lmforge, the Trainer and nanoGPT at three sizes up to GPT-2 124M, fp32 and bf16 (~15 min on 2 cores).
bench-scale: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/scale.py

# prepare on generated corpora of 0.1 and 2 GB: time against size, peak memory (~15 min; not in `bench`).
bench-prepare-scale: $(VENV)/.installed-bench
	$(BENCH_RUN) bench/prepare_scale.py

# On a GPU machine: the CUDA tests, then training at GPT-2 124M against the Trainer (at most 8 min).
# Without CUDA it runs its CPU part only. Not in `bench`.
gpu-check: $(VENV)/.installed-bench $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error timeout --kill-after=15 480 $(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
