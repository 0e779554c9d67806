"""scripts/gpu_check.py on the CPU: its figures by hand, its refusal without CUDA, and its parts at small sizes
(so the GPU check cannot rot between the rare runs on a GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_peak_is_read_from_the_table_by_device_name(name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak


def test_matmul_parameters_of_tinyllama_by_hand():
    # per layer: q and o 2048², k and v 2048·256, gate/up/down 2048·5632; 22 layers; the head 2048·32000
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632
    assert gpu_check.matmul_params(gpu_check.LLAMA_1B) == 22 * per_layer + 2048 * 32000 == 1_034_420_224
    # 6N + 12·L·d·T at T = 2048
    assert gpu_check.flops_per_token(gpu_check.LLAMA_1B, 2048) == 6 * 1_034_420_224 + 12 * 22 * 2048 * 2048


def test_matmul_parameters_match_a_built_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = gpu_check.LLAMA_TINY
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = model.get_input_embeddings().weight.numel()
    assert gpu_check.matmul_params(shape) == sum(p.numel() for p in model.parameters()) - embedding - norms


def test_mfu_by_hand():
    shape = {"vocab_size": 10, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    n = 2 * 16 + 2 * 4 * 2 + 3 * 4 * 8 + 4 * 10  # 184
    assert gpu_check.flops_per_token(shape, 3) == 6 * n + 12 * 1 * 4 * 3  # 1248
    assert gpu_check.mfu(1e12, shape, 3, peak_tflops=2496.0) == pytest.approx(0.5)


def test_state_dict_difference_and_medians():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    assert gpu_check.max_abs_diff(a, {k: v.clone() for k, v in a.items()}) == 0.0
    assert gpu_check.max_abs_diff(a, {"w": torch.tensor([1.0, 2.25]), "b": torch.tensor([0.5])}) == 0.25
    assert gpu_check.max_abs_diff(a, {"w": a["w"]}) == float("inf")
    rows = [{"x": 100.0}, {"x": 3.0}, {"x": 1.0}, {"x": 2.0}]
    assert gpu_check.median_after(rows, "x", skip=1) == 2.0
    assert gpu_check.median_after(rows[:1], "x", skip=1) == 100.0


def test_without_cuda_it_stops_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "gpu_check: no CUDA device" in result.stderr and "--allow-cpu" in result.stderr


def test_pipeline_figures_read_a_finished_run(tiny_run):
    figures = gpu_check.pipeline_figures(tiny_run, "cpu")
    assert figures["stages"] == 8 and figures["ppo_devices"] == "cpu"  # the default pipeline, dpo included
    with pytest.raises(gpu_check.CheckFailed, match="models not on cuda"):
        gpu_check.pipeline_figures(tiny_run, "cuda")


def test_the_parts_run_on_the_cpu(tiny_run, tmp_path):
    """resume, zero3, throughput, ppo and dpo at the CPU sizes against the suite's tiny pipeline run."""
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--allow-cpu", "--out", str(tmp_path),
                             "--pipeline-run", str(tiny_run), "--parts", "resume,zero3,throughput,ppo,dpo"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = results["parts"]
    assert list(parts) == ["resume", "zero3", "throughput", "ppo", "dpo"] and all(p["ok"] for p in parts.values())
    assert parts["resume"]["figures"] == {"ppo_float32_max_abs_diff": 0.0}  # sl_train's resume: tests/test_sl_train.py
    assert parts["throughput"]["figures"]["zero0_tokens_per_s"] > 0 and parts["throughput"]["figures"]["zero2_tokens_per_s"] > 0
    ppo = parts["ppo"]["figures"]
    assert ppo["rollout_s"] > 0 and ppo["score_s"] > 0 and ppo["update_s"] > 0
    assert ppo["rollout_s"] + ppo["score_s"] + ppo["update_s"] <= ppo["seconds"] + 2e-3
    dpo = parts["dpo"]["figures"]
    assert dpo["train_pairs"] == 36 and dpo["reference_s"] > 0 and dpo["pairs_per_s"] > 0 and dpo["tokens_per_s"] > 0
    assert "| resume | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_kernel_time_is_split_by_kind():
    kernels = [("nvjet_tst_128x256_64x4_sm90", 50.0), ("sm90_xmma_gemm_bf16bf16", 10.0),
               ("pytorch_flash::flash_bwd_kernel", 15.0), ("cudnn_generated_fort_native_sdpa_sm90", 5.0),
               ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 8.0),
               ("ncclDevKernel_AllReduce_Sum_bf16", 2.0), ("void at::native::vectorized_elementwise_kernel<mul>", 6.0),
               ("triton_poi_fused__scaled_dot_product_attention_transpose_0", 4.0)]
    assert gpu_check.kernel_shares(kernels) == {"fused": 0.04, "attention": 0.2, "matmul": 0.6, "optimizer": 0.08,
                                                "communication": 0.02, "other": 0.06}

