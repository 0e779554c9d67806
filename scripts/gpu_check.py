"""The GPU check: one command that proves cai's CUDA, bf16 and DeepSpeed path on an accelerator and measures
how close its training loop comes to the card's limit.

    .venv/bin/python scripts/gpu_check.py --wheels .whl     # on a CPU machine with the package index (make gpu-wheels)
    python scripts/gpu_check.py --out DIR                     # on the GPU machine: every part, then a JSON and a table

The GPU machine needs torch (CUDA) and transformers; the packages cai needs beside them (DeepSpeed, datasets,
Hydra, OmegaConf and their own needs) travel as the wheels that ``--wheels`` downloads, or builds where the
index has only a source archive, at the versions this environment runs. No model weights travel: every model
is built in-process from a config, with random weights. The parts, each recorded as passed or failed with its
figures, one failure never stopping the next:

- ``pipeline``: the tiny pipeline end to end, every stage with ``model.device=cuda model.dtype=bfloat16``;
  PPO's manifest must place all four models (policy, reference, value, reward) on the GPU.
- ``resume``: ``sl_train`` (bf16, then fp16) and ``ppo`` (bf16), each SIGKILLed after its first resumable
  checkpoint and run again to the end, against an uninterrupted run with the same settings
  (``deterministic=true``): the resumed run must have read its DeepSpeed checkpoint through cai's
  ``weights_only`` allowlist, and the final weights are compared bit for bit.
- ``zero3``: one PPO step under ZeRO-3.
- ``throughput``: a Llama-shaped model of about 1.1B parameters (TinyLlama's shape) in cai's own training loop
  (``cai.training.build_engine`` and ``fit``), bf16, ZeRO-0 and ZeRO-2 with one micro-batch of 8 × 2048 tokens
  per optimizer step, and ZeRO-2 with four, eager and compiled (``sl_train.compile``): tokens/s, peak memory,
  and the GPU time of a profiled step split into matrix products, attention, optimizer and the rest; MFU, model FLOPs per
  token counted as 6N + 12·L·d·T (PaLM, appendix B; N the parameters of every matrix product, the input
  embedding excluded), against the card's dense bf16 peak from its datasheet (``PEAK_BF16_TFLOPS``, by device
  name; ``--peak-tflops`` for another card) and against a measured 8192³ bf16 matrix product.
- ``ppo``: PPO's step time split into rollout, scoring and update (``rollout_s``, ``score_s``, ``update_s``
  in the stage's metrics.jsonl) with a model of that shape as policy, reference, reward and value.
- ``dpo``: the DPO stage's throughput with a model of that shape as policy and reference, on the 40 built-in
  helpful pairs (``cai/prompts/helpful_pairs.jsonl``, 36 trained on): the reference pass's seconds, then the median
  step time, pairs/s and tokens/s of training.

Without a CUDA device the script stops with one line, unless ``--allow-cpu``: then the same parts run on the
CPU in fp32 with small shapes (the test suite does this, so the check cannot rot between GPU runs).
Results: ``gpu_check.json`` (written after every part), ``gpu_check.md`` (the table) and ``gpu_check.log``
(every command and its output) in ``--out``; run folders in ``--work``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("pipeline", "resume", "zero3", "throughput", "ppo", "dpo")

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from each card's datasheet, by a piece of the name
# torch.cuda.get_device_name() gives; the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),   # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),   # SXM; also GH200
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)

# TinyLlama-1.1B's shape: 22 layers, width 2048, grouped-query attention with 4 KV heads, a 32000-word vocabulary.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)
LLAMA_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)

# Packages cai needs that the GPU machine's image lacks (or holds at a version these do not accept), with the
# needs of those packages; transformers, tokenizers, safetensors, huggingface_hub, numpy, pyarrow, pandas and
# torch are the image's own.
CARRIED = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
           "datasets", "dill", "multiprocess", "fsspec", "hydra-core", "omegaconf", "antlr4-python3-runtime")
SOURCE_ONLY = ("deepspeed", "antlr4-python3-runtime")  # the package index has no wheel of these: built here
GPU_PYTHON = "3.12"  # the GPU machine's interpreter
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class CheckFailed(RuntimeError):
    """A part's check did not hold; the message says what was expected and what came out."""


@dataclass(frozen=True)
class Sizes:
    """What the parts run at: a GPU run's sizes, or small CPU ones that exercise the same code."""
    device: str
    dtype: str                   # the pipeline's, the ZeRO-3 step's and the big models' precision
    resumed: tuple               # the stages the resume part kills and resumes (the CPU run: PPO, the one with two engines)
    resume_dtypes: tuple         # precisions the resume part checkpoints in
    llama: dict                  # the throughput model's shape
    seq_len: int
    micro_batch: int
    train_steps: int             # throughput: optimizer steps per ZeRO stage (the first two are not timed)
    ppo: tuple                   # overrides of the PPO breakdown run
    dpo_micro_batch: int         # pairs per DPO step
    dpo: tuple                   # other overrides of the DPO throughput run


GPU = Sizes(device="cuda", dtype="bfloat16", resumed=("sl_train", "ppo"), resume_dtypes=("bfloat16", "float16"),
            llama=LLAMA_1B, seq_len=2048,
            micro_batch=8, train_steps=12,
            ppo=("ppo.steps=4", "ppo.ppo_epochs=2", "ppo.batch_size=32", "ppo.num_minibatches=4", "ppo.max_new_tokens=128",
                 "generation.batch_size=32", "ppo.num_prompts=96", "ppo.num_helpful=0"),
            dpo_micro_batch=8, dpo=("dpo.epochs=4", "dpo.max_length=1024"))
CPU = Sizes(device="cpu", dtype="float32", resumed=("ppo",), resume_dtypes=("float32",), llama=LLAMA_TINY, seq_len=64, micro_batch=2,
            train_steps=4, ppo=("ppo.steps=2", "ppo.ppo_epochs=2", "ppo.batch_size=4", "ppo.num_minibatches=2", "ppo.max_new_tokens=8",
                                "generation.batch_size=4", "ppo.num_prompts=8", "ppo.num_helpful=0"),
            dpo_micro_batch=4, dpo=("dpo.epochs=1", "dpo.max_length=1024"))


# ---------------------------------------------------------------------------------------------
# Pure figures (tested on the CPU)
# ---------------------------------------------------------------------------------------------

def peak_bf16_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of the card called ``device_name``, or None for a card not in the table."""
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece.lower() in device_name.lower():
            return tflops
    return None


def matmul_params(llama: dict) -> int:
    """Parameters that take part in a matrix product per token: every layer's attention and MLP weights and
    the output head (the input embedding is a lookup). Norm weights are left out (no matrix product)."""
    d, kv = llama["hidden_size"], llama["hidden_size"] // llama["num_attention_heads"] * llama["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * llama["intermediate_size"]  # q, o; k, v; gate, up, down
    return llama["num_hidden_layers"] * per_layer + d * llama["vocab_size"]


def flops_per_token(llama: dict, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6N + 12·L·d·T (PaLM, appendix B)."""
    return 6 * matmul_params(llama) + 12 * llama["num_hidden_layers"] * llama["hidden_size"] * seq_len


def mfu(tokens_per_s: float, llama: dict, seq_len: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the peak."""
    return tokens_per_s * flops_per_token(llama, seq_len) / (peak_tflops * 1e12)


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys (inf when they differ in keys
    or shapes)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def median_after(rows: list[dict], key: str, skip: int) -> float:
    """The median of ``key`` over ``rows`` after the first ``skip`` (warm-up) rows, or over all if there are no more."""
    values = [r[key] for r in rows if key in r]
    return statistics.median(values[skip:] if len(values) > skip else values)


def table(results: dict) -> str:
    """The results as a Markdown table: one row per part."""
    lines = ["| part | result | seconds | figures |", "|---|---|---|---|"]
    for name, part in results["parts"].items():
        figures = "; ".join(f"{k} {v}" for k, v in part.get("figures", {}).items())
        result = "passed" if part["ok"] else f"FAILED: {part.get('error', '')}"
        lines.append(f"| {name} | {result} | {part['seconds']:.0f} | {figures} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running stages
# ---------------------------------------------------------------------------------------------

@dataclass
class Check:
    sizes: Sizes
    out: Path
    work: Path
    peak_tflops: float | None
    pipeline_run: Path | None = None  # the tiny pipeline's run dir: the resume and ZeRO-3 parts copy their inputs from it
    results: dict = field(default_factory=dict)

    def stage_args(self, run_dir: Path, dtype: str | None = None) -> list[str]:
        return [f"run_dir={run_dir}", "debug=tiny", "progress=false", f"model.device={self.sizes.device}",
                f"model.dtype={dtype or self.sizes.dtype}"]

    def command(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def run(self, cmd: list[str], what: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a cai command to the end; its output goes to the log; a non-zero exit fails the part."""
        start = time.time()
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())
        self.log(cmd, result.stdout + result.stderr, f"exit {result.returncode} after {time.time() - start:.1f} s")
        if result.returncode != 0:
            raise CheckFailed(f"{what}: exit {result.returncode}: {_last_line(result.stderr or result.stdout)}")
        return result

    def kill_after_checkpoint(self, cmd: list[str], latest: Path, at_step: int, what: str, timeout: int = 600) -> None:
        """Start ``cmd`` and SIGKILL its process group once ``latest`` names a step >= ``at_step``."""
        start = time.time()
        log = self.out / "gpu_check.log"
        with open(log, "a") as sink:
            sink.write(f"\n$ {' '.join(cmd)}   (to be killed after checkpoint step {at_step})\n")
            sink.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
            while time.time() - start < timeout and proc.poll() is None:
                if latest.exists() and json.loads(latest.read_text())["step"] >= at_step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
            proc.wait()
            sink.write(f"[exit {proc.returncode} after {time.time() - start:.1f} s]\n")
        if proc.returncode != -signal.SIGKILL:
            raise CheckFailed(f"{what}: the run ended (exit {proc.returncode}) before a checkpoint at step {at_step} "
                              f"could be killed")

    def log(self, cmd: list[str], output: str, status: str) -> None:
        with open(self.out / "gpu_check.log", "a") as sink:
            sink.write(f"\n$ {' '.join(cmd)}\n{output}[{status}]\n")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(table(self.results) + "\n")

    def copy_run(self, stages: tuple, target: Path) -> Path:
        """A fresh run dir holding copies of the pipeline run's ``stages`` (the inputs of the stage to run there)."""
        if self.pipeline_run is None:
            raise CheckFailed("needs the tiny pipeline's run (the pipeline part, or --pipeline-run DIR)")
        if target.exists():
            shutil.rmtree(target)
        for stage in stages:
            shutil.copytree(self.pipeline_run / stage, target / stage, symlinks=False)
        return target


def _env() -> dict:
    """The environment of a cai command: this process's, less the process-group variables the throughput part
    set for itself (a child would otherwise try to join that group's port), with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-400:] if lines else "(no output)"


def _manifest(folder: Path) -> dict:
    from cai.lineage import read_manifest

    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete":
        raise CheckFailed(f"{folder}: the stage's manifest does not say complete")
    return manifest


def _on_device(manifest: dict, device: str, where: str) -> dict:
    devices = manifest.get("devices", {})
    off = {role: d for role, d in devices.items() if not d.startswith(device)}
    if not devices or off:
        raise CheckFailed(f"{where}: models not on {device}: {off or 'no devices recorded'}")
    return devices


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------

def part_pipeline(c: Check) -> dict:
    """Every stage of the tiny pipeline on the device in the check's precision."""
    run_dir = c.work / "pipeline"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    c.run(c.command("cai.pipeline", *c.stage_args(run_dir)), "the tiny pipeline")
    figures = pipeline_figures(run_dir, c.sizes.device)
    c.pipeline_run = run_dir
    return figures


def pipeline_figures(run_dir: Path, device: str) -> dict:
    """Every stage ran (pipeline.json) and PPO placed all its models on ``device``; each stage's wall time."""
    record = json.loads((run_dir / "pipeline.json").read_text())
    not_ran = {r["stage"]: r["status"] for r in record["stages"] if r["status"] != "ran"}
    if not_ran:
        raise CheckFailed(f"stages that did not run: {not_ran}")
    devices = _on_device(_manifest(run_dir / "ppo"), device, "ppo")
    return {"stages": len(record["stages"]), "ppo_devices": ",".join(sorted(set(devices.values()))),
            **{f"{r['stage']}_s": r["seconds"] for r in record["stages"]}}


RESUMED = (  # stage, the stages it reads, its overrides, the checkpoint step to kill it after
    ("sl_train", ("sl_generate",), ("sl_train.epochs=20", "sl_train.save_every=5"), 5),
    ("ppo", ("sl_train", "pm_finetune"), ("ppo.steps=12", "ppo.save_every=3", "ppo.target_kl=0.5"), 3),
)


def part_resume(c: Check) -> dict:
    """SIGKILL after a checkpoint, rerun to the end, and compare with an uninterrupted run."""
    from safetensors.torch import load_file

    figures, failures = {}, []
    for stage, inputs, overrides, at_step in (r for r in RESUMED if r[0] in c.sizes.resumed):
        for dtype in c.sizes.resume_dtypes if stage == "sl_train" else c.sizes.resume_dtypes[:1]:
            name = f"{stage}_{dtype}"
            killed, clean = c.copy_run(inputs, c.work / f"resume-{name}"), c.copy_run(inputs, c.work / f"clean-{name}")
            args = (*overrides, "deterministic=true")
            try:
                cmd = c.command(f"cai.stages.{stage}", *c.stage_args(killed, dtype), *args)
                c.kill_after_checkpoint(cmd, killed / stage / "checkpoints" / "latest.json", at_step, name)
                again = c.run(cmd, f"{name}: the rerun after the kill")
                if "resuming at step" not in again.stdout:
                    raise CheckFailed(f"{name}: the rerun did not resume from the checkpoint")
                c.run(c.command(f"cai.stages.{stage}", *c.stage_args(clean, dtype), *args), f"{name}: the uninterrupted run")
            except CheckFailed as e:
                failures.append(str(e))
                continue
            resumed = load_file(str(killed / stage / "model" / "model.safetensors"))
            uninterrupted = load_file(str(clean / stage / "model" / "model.safetensors"))
            diff = max_abs_diff(resumed, uninterrupted)
            figures[f"{name}_max_abs_diff"] = diff
            if diff != 0.0:
                failures.append(f"{name}: resumed weights differ from the uninterrupted run's by up to {diff:.3g}")
    if failures:
        raise CheckFailed("; ".join(failures), figures)
    return figures


def part_zero3(c: Check) -> dict:
    """One PPO step with the policy and value engines under ZeRO-3."""
    run_dir = c.copy_run(("sl_train", "pm_finetune"), c.work / "zero3")
    c.run(c.command("cai.stages.ppo", *c.stage_args(run_dir), "deepspeed=zero3", "ppo.steps=1"), "ZeRO-3 PPO")
    manifest = _manifest(run_dir / "ppo")
    _on_device(manifest, c.sizes.device, "ppo under ZeRO-3")
    from cai.metrics import read_metrics

    step = read_metrics(run_dir / "ppo")[-1]
    return {"step_s": step["seconds"], "score": round(step["score"], 4)}


def part_throughput(c: Check) -> dict:
    """Tokens/s, memory, GPU-time shares and MFU of a ~1.1B Llama in cai's training loop (``THROUGHPUT_RUNS``)."""
    import gc

    import torch

    figures = {"params_b": None, "flops_per_token_g": round(flops_per_token(c.sizes.llama, c.sizes.seq_len) / 1e9, 3)}
    if c.sizes.device == "cuda":
        figures["matmul_tflops"] = round(measured_matmul_tflops(), 1)
    for name, zero, grad_accum, compiled in THROUGHPUT_RUNS:
        if compiled and c.sizes.device != "cuda":
            continue
        profile = name in ("zero0", "zero2_accum4_compiled")
        tokens_per_s, params, peak_gib, shares = train_llama(c, zero, grad_accum, compiled, profile)
        gc.collect()  # the run's engine and model go before the next run's are built
        if c.sizes.device == "cuda":
            torch.cuda.empty_cache()
        figures["params_b"] = round(params / 1e9, 3)
        figures[f"{name}_tokens_per_s"] = round(tokens_per_s)
        figures[f"{name}_peak_gib"] = peak_gib
        if c.peak_tflops:
            figures[f"{name}_mfu"] = round(mfu(tokens_per_s, c.sizes.llama, c.sizes.seq_len, c.peak_tflops), 4)
        if "matmul_tflops" in figures:
            achieved = tokens_per_s * flops_per_token(c.sizes.llama, c.sizes.seq_len) / 1e12
            figures[f"{name}_of_matmul"] = round(achieved / figures["matmul_tflops"], 4)
        figures.update({f"{name}_gpu_time_{kind}": share for kind, share in shares.items()})
    return figures


# name, ZeRO stage, micro-batches per optimizer step, torch.compile (on a GPU only: inductor's CPU compile is slow)
THROUGHPUT_RUNS = (("zero0", 0, 1, False), ("zero2", 2, 1, False), ("zero2_accum4", 2, 4, False),
                   ("zero2_accum4_compiled", 2, 4, True))

KERNEL_KINDS = (  # the first pattern a kernel's (lower-case) name matches names its kind; "other" otherwise
    ("fused", ("triton",)),  # inductor's generated kernels (torch.compile); named after the ops they fuse, attention's too
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
)


def kernel_shares(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """(kernel name, GPU time) pairs -> each kind's share of the GPU time (``KERNEL_KINDS``; "other" is eager
    elementwise work, norms, the loss, copies; "fused" the same work compiled), rounded to 3 places."""
    totals = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, time_ in kernels:
        kind = next((k for k, pieces in KERNEL_KINDS if any(p in name.lower() for p in pieces)), "other")
        totals[kind] += time_
    whole = sum(totals.values()) or 1.0
    return {kind: round(t / whole, 3) for kind, t in totals.items()}


def train_llama(c: Check, zero: int, grad_accum: int, compiled: bool, profile: bool) -> tuple[float, int, float | None, dict]:
    """(median tokens/s after two warm-up steps, parameters, peak GPU memory in GiB, GPU-time shares) of
    ``train_steps`` optimizer steps on random tokens, through ``cai.training.build_engine`` and ``fit``; with
    ``profile`` on a GPU, one more step runs under the profiler and its kernels' time is split by kind."""

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cai import distributed, training
    from cai.metrics import read_metrics

    distributed.init_distributed()
    dtype = getattr(torch, c.sizes.dtype)
    device = torch.device(c.sizes.device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**c.sizes.llama, tie_word_embeddings=False), dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    s = OmegaConf.create({"lr": 1e-4, "warmup_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 1.0,
                          "micro_batch_size": c.sizes.micro_batch, "grad_accum": grad_accum, "compile": compiled})
    cfg = OmegaConf.create({"deepspeed": {"zero_optimization": {"stage": zero}}})
    plan = training.Plan(rows=c.sizes.train_steps * c.sizes.micro_batch * grad_accum, world=1,
                         micro_batch_size=c.sizes.micro_batch, grad_accum=grad_accum, epochs=1, seed=0, name="gpu-check")
    engine, scheduler = training.build_engine(model, cfg, s, plan.total_steps)
    generator = torch.Generator(device=device).manual_seed(0)

    def loss_fn(rows: list[int]):
        ids = torch.randint(c.sizes.llama["vocab_size"], (len(rows), c.sizes.seq_len), device=device, generator=generator)
        return engine(input_ids=ids, labels=ids).loss, {"tokens": ids.numel()}

    out = c.work / f"throughput-zero{zero}-accum{grad_accum}{'-compiled' if compiled else ''}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    training.fit(engine, scheduler, plan, stage=out.name, out=out, save_every=10**9, resume=False, rank=0,
                 loss_fn=loss_fn, progress=False)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None
    tokens_per_s = median_after(read_metrics(out), "tokens_per_s", skip=2)
    shares = {}
    if profile and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(grad_accum):
                engine.backward(loss_fn(list(range(c.sizes.micro_batch)))[0])
                engine.step()
            torch.cuda.synchronize()
        shares = kernel_shares([(e.key, e.self_device_time_total) for e in prof.key_averages()
                                if e.device_type == torch.autograd.DeviceType.CUDA])
    engine.destroy()
    return tokens_per_s, params, peak, shares


def measured_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n×n×n bf16 matrix product on random data (mean of ``repeats`` after three warm-ups)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def llama_folder(c: Check, folder: Path) -> int:
    """The throughput model's shape on the tiny tokenizer's vocabulary, random weights, saved with that tokenizer to
    ``folder`` (anew); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cai.models import tiny_tokenizer

    tok = tiny_tokenizer()
    if folder.exists():
        shutil.rmtree(folder)
    shape = {**c.sizes.llama, "vocab_size": len(tok)}
    with torch.device(c.sizes.device):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id), dtype=getattr(torch, c.sizes.dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def part_ppo(c: Check) -> dict:
    """PPO step time by phase with the throughput model's shape (on the tiny tokenizer's vocabulary) in every role."""
    from cai.metrics import read_metrics

    folder = c.work / "ppo-model"
    params = llama_folder(c, folder)
    run_dir = c.work / "ppo-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    c.run(c.command("cai.stages.ppo", f"run_dir={run_dir}", "progress=false", f"model.path={folder}",
                    f"model.device={c.sizes.device}", f"model.dtype={c.sizes.dtype}", f"ppo.policy={folder}",
                    f"ppo.reward_model={folder}", "ppo.save_every=1000", "ppo.log_samples_every=0", *c.sizes.ppo),
          "PPO with the large model")
    _on_device(_manifest(run_dir / "ppo"), c.sizes.device, "ppo")
    rows = read_metrics(run_dir / "ppo")
    figures = {"params_b": round(params / 1e9, 3)}
    for key in ("seconds", "rollout_s", "score_s", "update_s", "samples_per_s", "response_length"):
        figures[key] = round(median_after(rows, key, skip=1), 3)
    return figures


def part_dpo(c: Check) -> dict:
    """The DPO stage's throughput with the throughput model's shape (on the tiny tokenizer's vocabulary) as policy and
    reference, on the built-in helpful pairs: the reference pass, then training (one row per pair, ``pair_logps``)."""
    from cai.metrics import read_metrics

    folder = c.work / "dpo-model"
    params = llama_folder(c, folder)
    run_dir = c.work / "dpo-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    c.run(c.command("cai.stages.dpo", f"run_dir={run_dir}", "progress=false", f"model.path={folder}",
                    f"model.device={c.sizes.device}", f"model.dtype={c.sizes.dtype}",
                    f"dpo.pairs={ROOT / 'cai' / 'prompts' / 'helpful_pairs.jsonl'}", "dpo.eval_fraction=0.1", "dpo.loss=sigmoid",
                    f"dpo.micro_batch_size={c.sizes.dpo_micro_batch}", "dpo.save_every=1000", *c.sizes.dpo),
          "DPO with the large model")
    manifest = _manifest(run_dir / "dpo")
    rows = [r for r in read_metrics(run_dir / "dpo") if r.get("split") != "eval"]
    step_s = median_after(rows, "seconds", skip=2)
    return {"params_b": round(params / 1e9, 3), "train_pairs": manifest["counts"]["train_pairs"],
            "reference_s": manifest["reference_s"], "step_s": round(step_s, 3),
            "pairs_per_s": round(c.sizes.dpo_micro_batch / step_s, 2),
            "tokens_per_s": round(median_after(rows, "tokens_per_s", skip=2))}


# ---------------------------------------------------------------------------------------------
# Wheels for the GPU machine
# ---------------------------------------------------------------------------------------------

def prepare_wheels(folder: Path) -> list[str]:
    """Download (or build, for ``SOURCE_ONLY``) wheels of ``CARRIED`` at the versions installed here, for the
    GPU machine's Python and platform, into ``folder``; returns the wheel file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pinned = {name: f"{name}=={importlib.metadata.version(name)}" for name in CARRIED}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    binary = [spec for name, spec in pinned.items() if name not in SOURCE_ONLY]
    platforms = [arg for p in GPU_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
                    "--implementation", "cp", *platforms, "-d", str(folder), *binary], check=True)
    # pure-Python source archives: a wheel built here installs there unchanged (DeepSpeed builds no ops ahead
    # of time by default; cai uses none of them on the GPU: its Adam is PyTorch's fused one)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                    *(pinned[name] for name in SOURCE_ONLY)], check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def environment(sizes: Sizes) -> dict:
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "deepspeed", "datasets", "hydra-core", "omegaconf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = {"name": "cpu"}
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
    return {"device": device, "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="where the JSON, table and log go")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: OUT/work)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--pipeline-run", type=Path, default=None,
                        help="an existing tiny pipeline run for the resume and zero3 parts (instead of the pipeline part's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for a card not in the table")
    parser.add_argument("--allow-cpu", action="store_true", help="without a CUDA device, run the parts on the CPU at small sizes")
    parser.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                        help="only prepare the GPU machine's wheels in DIR (needs the package index), then exit")
    args = parser.parse_args(argv)

    if args.wheels is not None:
        names = prepare_wheels(args.wheels)
        size = sum((args.wheels / n).stat().st_size for n in names) / 2**20
        print(f"gpu_check: {len(names)} wheels, {size:.1f} MiB, in {args.wheels}")
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); run it on a GPU machine, "
                         f"or add --allow-cpu for the small CPU run")
    sizes = GPU if torch.cuda.is_available() else CPU
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").write_text("")
    env = environment(sizes)
    peak = args.peak_tflops or (peak_bf16_tflops(env["device"]["name"]) if sizes.device == "cuda" else None)
    check = Check(sizes=sizes, out=args.out, work=(args.work or args.out / "work"), peak_tflops=peak,
                  pipeline_run=args.pipeline_run)
    check.work.mkdir(parents=True, exist_ok=True)
    check.results = {**env, "peak_bf16_tflops": peak, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    print(f"gpu_check: {env['device']['name']} ({sizes.device}, {sizes.dtype}), parts: {', '.join(parts)}", flush=True)
    for name in parts:
        start = time.time()
        try:
            result = {"ok": True, "figures": globals()[f"part_{name}"](check)}
        except CheckFailed as e:
            result = {"ok": False, "error": str(e.args[0]), "figures": e.args[1] if len(e.args) > 1 else {}}
        except Exception as e:  # a bug or a crash in this part: recorded, and the next part still runs
            check.log([name], traceback.format_exc(), "crashed")
            result = {"ok": False, "error": f"{type(e).__name__}: {_last_line(str(e))}", "figures": {}}
        result["seconds"] = round(time.time() - start, 1)
        check.results["parts"][name] = result
        check.save()
        print(f"gpu_check: {name}: {'passed' if result['ok'] else 'FAILED: ' + result['error']} "
              f"({result['seconds']:.0f} s) {result['figures']}", flush=True)
    print("\n" + table(check.results))
    failed = [n for n, r in check.results["parts"].items() if not r["ok"]]
    print(f"\ngpu_check: {len(parts) - len(failed)} passed, {len(failed)} failed -> {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
