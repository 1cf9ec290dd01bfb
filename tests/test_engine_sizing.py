"""Engine arithmetic and placement of the GPU recipes, without a GPU or an engine: the 14B teacher
of recipes/paper.yaml does not fit one 24 GiB GPU and does with tensor parallelism 2; the pools of
the GPU recipes fit the node types of cluster.yaml; mismatched asks are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from actors.config import ConfigError, PoolConfig, load_config
from actors.models import ModelSpec
from actors.sampler import VLLMOptions
from actors.vllm_engine import (
    check_engine_fits,
    check_pool_matches_engine,
    engine_plan,
    kv_bytes_per_token,
    model_parameters,
    placement_bundles,
)
from pipelines.distill import DistillConfig
from pipelines.evaluate import EvalConfig

REPO = Path(__file__).resolve().parents[1]

# The published config.json fields of the two models the GPU recipes name.
DEEPSEEK_R1_DISTILL_QWEN_14B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
}
QWEN25_15B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6,
}


def counted_parameters(config: dict) -> int:
    """The parameter count of the real transformers model built from the config (on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("config", [DEEPSEEK_R1_DISTILL_QWEN_14B, QWEN25_15B], ids=["14b", "1.5b"])
def test_parameter_count_matches_the_real_model(config):
    # within 0.1%: the formula leaves out the q/k/v biases of Qwen2
    assert model_parameters(config) == pytest.approx(counted_parameters(config), rel=1e-3)


def test_kv_cache_bytes_by_hand():
    # 2 (keys, values) x 48 layers x 8 KV heads x 128 dims x 2 bytes
    assert kv_bytes_per_token(DEEPSEEK_R1_DISTILL_QWEN_14B, 2) == 2 * 48 * 8 * 128 * 2 == 196_608


def test_the_14b_teacher_needs_two_24_gib_gpus():
    spec = ModelSpec(base="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", dtype="bfloat16")
    one = VLLMOptions(accelerator_type="A10G", max_model_len=6144, tensor_parallel_size=1)
    with pytest.raises(ConfigError, match=r"teacher.options.tensor_parallel_size: .*14.8B parameters.* needs about "
                                          r"30.\d GiB per GPU.*A10G gives 21.6 GiB"):
        check_engine_fits("teacher.options", spec, one, DEEPSEEK_R1_DISTILL_QWEN_14B)
    plan = check_engine_fits("teacher.options", spec, one.model_copy(update={"tensor_parallel_size": 2}),
                             DEEPSEEK_R1_DISTILL_QWEN_14B)
    # 27.5 GiB of weights / 2 + 1.125 GiB of KV cache / 2 + 1.5 GiB
    assert plan.fits and plan.gpus == 2
    assert plan.weights_gib == pytest.approx(model_parameters(DEEPSEEK_R1_DISTILL_QWEN_14B) * 2 / 2 / 1024**3)
    assert plan.kv_gib == pytest.approx(196_608 * 6144 / 2 / 1024**3)
    assert plan.needed_gib < 21.6
    # a 48 GiB GPU holds it whole
    assert check_engine_fits("teacher.options", spec, one.model_copy(update={"accelerator_type": "L40S"}),
                             DEEPSEEK_R1_DISTILL_QWEN_14B).fits
    # an unknown GPU type or a CPU engine is not sized (nothing to size against)
    assert engine_plan(DEEPSEEK_R1_DISTILL_QWEN_14B, VLLMOptions(accelerator_type="X1"), "bfloat16").fits is None
    assert check_engine_fits("generator.options", spec, VLLMOptions(), DEEPSEEK_R1_DISTILL_QWEN_14B) is None


def test_placement_bundles_and_pool_checks():
    cpu = PoolConfig(num_cpus=1)
    assert placement_bundles(VLLMOptions(), cpu) == [{"CPU": 1.0}]
    gpu = PoolConfig(num_cpus=8, num_gpus=2)
    assert placement_bundles(VLLMOptions(tensor_parallel_size=2), gpu) == [{"GPU": 1.0, "CPU": 4.0}] * 2
    assert placement_bundles(VLLMOptions(tensor_parallel_size=2, pipeline_parallel_size=2),
                             PoolConfig(num_cpus=4, num_gpus=4)) == [{"GPU": 1.0, "CPU": 1.0}] * 4
    with pytest.raises(ConfigError, match="tensor and pipeline parallelism need GPUs"):
        placement_bundles(VLLMOptions(tensor_parallel_size=2), cpu)
    with pytest.raises(ConfigError, match=r"teacher.resources.num_gpus: 1 GPU\(s\) per engine, but .* = 2"):
        check_pool_matches_engine("teacher.resources", VLLMOptions(tensor_parallel_size=2), PoolConfig(num_gpus=1))
    with pytest.raises(ConfigError, match="resources.sampler.label_selector"):
        check_pool_matches_engine("resources.sampler", VLLMOptions(), PoolConfig(label_selector={"a": "b"}))


def test_the_gpu_recipes_fit_the_cluster(tmp_path):
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    nodes = {name: node["resources"] for name, node in cluster["available_node_types"].items()}
    most = {name: node["max_workers"] for name, node in cluster["available_node_types"].items()}
    gpus_in_cluster = sum(nodes[name].get("GPU", 0) * most[name] for name in nodes)

    def fits_a_node(cpus: float, gpus: float) -> bool:
        return any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes.values())

    paper = load_config(DistillConfig, REPO / "recipes" / "paper.yaml")
    teacher = paper.teacher.options
    check_pool_matches_engine("teacher.resources", teacher, paper.teacher.resources)
    model_dir = tmp_path / "teacher"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(DEEPSEEK_R1_DISTILL_QWEN_14B))
    assert check_engine_fits("teacher.options", ModelSpec(base=str(model_dir), dtype="bfloat16"), teacher).fits
    assert fits_a_node(paper.teacher.resources.num_cpus, paper.teacher.resources.num_gpus)  # gpu_worker_4x
    for training in (paper.sft.scaling, paper.grpo.scaling):
        assert fits_a_node(training.cpus_per_worker, 1) and training.num_workers <= gpus_in_cluster

    evaluation = load_config(EvalConfig, REPO / "recipes" / "paper-eval.yaml")
    engine = evaluation.generator.options
    check_pool_matches_engine("resources.sampler", engine, evaluation.resources.sampler)
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(QWEN25_15B))
    assert check_engine_fits("generator.options", ModelSpec(base=str(student), dtype="bfloat16"), engine).fits
    pools = [evaluation.resources.sampler, evaluation.resources.judge, evaluation.resources.scorer]
    assert all(fits_a_node(pool.num_cpus, pool.num_gpus) for pool in pools)
    assert sum(pool.max_actors * pool.num_gpus for pool in pools) <= gpus_in_cluster
    assert max(evaluation.scoring.layers) <= QWEN25_15B["num_hidden_layers"]
    assert [b.name for b in evaluation.benchmarks] == ["dan", "wildjailbreak", "strongreject", "gsm8k", "mmlu",
                                                       "xstest", "or_bench"]
    # over-refusal is measured: benign prompts from WildJailbreak, XSTest's safe part, OR-Bench hard-1k
    assert [b.chosen_subset for b in evaluation.benchmarks if b.name in ("wildjailbreak", "xstest", "or_bench")] == [
        "all", "benign", "benign"]
    assert (evaluation.sampling.n, evaluation.sampling.temperature, evaluation.sampling.max_new_tokens) == (8, 0.7, 2048)
    assert evaluation.judge.name == "llama_guard" and evaluation.report.calibration_fraction == 0.3
