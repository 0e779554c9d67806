"""pm_pretrain and pm_finetune end to end: tiny models (PMP -> fine-tuning, a separable toy set, resume of each,
2 ranks, bad input) and one run of pm_finetune on the embedded SmolLM2 backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg, copy_stages, kill_then_rerun, outputs
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.preference import SHIFT_KEY, score_conversations

TINY_ARGS = ["debug=tiny", "progress=false"]


def _copy(tiny_run, tmp_path, stages=("sl_generate", "sl_train", "ai_feedback")):
    return copy_stages(tiny_run, tmp_path / "run", stages)


def _run_here(stage: str, run_dir, *overrides: str):
    """pm_pretrain or pm_finetune in this process, as run_stage runs it (its handle on its folder; exceptions as they
    are); the test asks for the ``process_group`` fixture."""
    import importlib

    from cai.stages import handle

    run = importlib.import_module(f"cai.stages.{stage}").run
    cfg = compose_cfg(stage, [*TINY_ARGS, f"run_dir={run_dir}", *overrides])
    return run(cfg, handle(run, cfg))


def test_pretrain_then_finetune(tiny_run, tmp_path, process_group, capsys):
    run_dir = _copy(tiny_run, tmp_path)
    _run_here("pm_pretrain", run_dir)
    manifest = read_manifest(run_dir / "pm_pretrain")
    assert manifest["status"] == "complete" and manifest["counts"]["train_pairs"] == 18 and manifest["counts"]["eval_pairs"] == 6
    _run_here("pm_finetune", run_dir)
    out = run_dir / "pm_finetune"
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["init"] == str(run_dir / "pm_pretrain" / "model")
    counts = manifest["counts"]
    assert counts["ai_pairs"] == 4 and counts["human_pairs"] == 4  # human_fraction 0.5: as many human as AI pairs
    assert counts["train_pairs"] + counts["eval_pairs"] == 8 and counts["reference_rows"] == 8
    evals = [m for m in read_metrics(out) if m.get("split") == "eval"]
    assert len(evals) == 2 and all({"accuracy", "ece", "mean_margin", "accuracy_ai", "accuracy_human"} <= m.keys() for m in evals)
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "eval.json").read_text())["reliability"]

    # the checkpoint loads with plain transformers; the documented function scores with the stored shift
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert getattr(model.config, SHIFT_KEY) == pytest.approx(manifest["reward_shift"]) != 0.0
    from datasets import load_from_disk

    reference = load_from_disk(str(run_dir / "sl_generate" / "dataset"))["messages"]
    scores = score_conversations(model, tok, reference)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)  # normalised on the SL-CAI samples

    # the PMP weights were the starting point: fine-tuning moved them, the head included
    pmp = load_file(str(run_dir / "pm_pretrain" / "model" / "model.safetensors"))
    tuned = load_file(str(out / "model" / "model.safetensors"))
    assert pmp.keys() == tuned.keys() and not torch.equal(pmp["score.weight"], tuned["score.weight"])
    capsys.readouterr()
    _run_here("pm_finetune", run_dir)
    assert "already complete" in capsys.readouterr().out


def _toy_pairs(n: int, seed: int, soft: bool) -> list[dict]:
    """Separable comparisons: the chosen reply is polite, the rejected one rude, around random prompts."""
    import random

    rng = random.Random(seed)
    subjects = ["the garden", "my bike", "a recipe", "the printer", "my essay", "the trip", "a budget", "the code"]
    polite = ["Thank you, happy to help with that.", "Sure, here is a kind and careful answer.", "Glad to help, thanks for asking."]
    rude = ["No. Figure it out yourself, idiot.", "Stop asking stupid questions.", "Go away, that is dumb."]
    rows = []
    for _ in range(n):
        row = {"prompt": [{"role": "user", "content": f"Can you help me with {rng.choice(subjects)}?"}],
               "chosen": [{"role": "assistant", "content": rng.choice(polite)}],
               "rejected": [{"role": "assistant", "content": rng.choice(rude)}]}
        if soft:
            row["p_chosen"] = rng.choice([0.7, 0.8, 0.9])
        rows.append(row)
    return rows


def test_finetuned_pm_separates_a_toy_set(tmp_path, process_group):
    toy = tmp_path / "toy"
    Dataset.from_list(_toy_pairs(24, 0, soft=False)).save_to_disk(str(toy / "pretrain"))
    Dataset.from_list(_toy_pairs(32, 1, soft=True)).save_to_disk(str(toy / "ai"))
    Dataset.from_list(_toy_pairs(32, 2, soft=False)).save_to_disk(str(toy / "human"))
    run_dir = tmp_path / "run"
    _run_here("pm_pretrain", run_dir, f"pm_pretrain.source={toy / 'pretrain'}", "pm_pretrain.epochs=1")
    _run_here("pm_finetune", run_dir, f"pm_finetune.ai_dataset={toy / 'ai'}", f"pm_finetune.human_source={toy / 'human'}",
              "pm_finetune.normalize=false", "pm_finetune.epochs=4", "pm_finetune.micro_batch_size=4")
    evals = [m for m in read_metrics(run_dir / "pm_finetune") if m.get("split") == "eval"]
    assert evals[-1]["pairs"] == 16 and evals[-1]["accuracy"] >= 0.9  # chance is 0.5
    assert evals[-1]["mean_margin"] > 0


def test_sigkill_then_rerun_resumes_to_the_same_weights(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path, stages=())
    args = [sys.executable, "-m", "cai.stages.pm_pretrain", *TINY_ARGS, f"run_dir={run_dir}", "pm_pretrain.epochs=12",
            "pm_pretrain.micro_batch_size=2", "pm_pretrain.save_every=5"]
    latest = run_dir / "pm_pretrain" / "checkpoints" / "latest.json"
    again = kill_then_rerun(args, latest, at_step=10)
    assert again.returncode == 0, again.stderr
    assert "resuming at step" in again.stdout
    rows = read_metrics(run_dir / "pm_pretrain")
    assert [m["step"] for m in rows if "split" not in m] == list(range(1, 109))  # 9 steps x 12 epochs, no gap or repeat
    assert len([m for m in rows if m.get("split") == "eval"]) == 12
    resumed = load_file(str(run_dir / "pm_pretrain" / "model" / "model.safetensors"))
    clean = tmp_path / "clean"
    subprocess.run([*args[:-4], f"run_dir={clean}", *args[-3:]], cwd=ROOT, check=True, capture_output=True)
    uninterrupted = load_file(str(clean / "pm_pretrain" / "model" / "model.safetensors"))
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_finetune_sigkill_then_rerun_resumes_to_the_uninterrupted_weights(tiny_run, tmp_path):
    """pm_finetune killed after its first checkpoint; the same command resumes and ends where tiny_run's own
    (uninterrupted) pm_finetune of the same config and inputs ended: same steps, loss curve and weights."""
    run_dir = _copy(tiny_run, tmp_path, stages=("sl_generate", "ai_feedback", "pm_pretrain"))
    out = run_dir / "pm_finetune"
    args = [sys.executable, "-m", "cai.stages.pm_finetune", *TINY_ARGS, f"run_dir={run_dir}"]
    latest = out / "checkpoints" / "latest.json"

    def left_running():
        manifest = read_manifest(out)
        assert manifest["status"] == "running" and json.loads(latest.read_text())["step"] < manifest["counts"]["total_steps"]

    again = kill_then_rerun(args, latest, at_step=2, after_kill=left_running)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout
    clean = tiny_run / "pm_finetune"
    ours, theirs = read_manifest(out), read_manifest(clean)
    for key in ("config_hash", "init_fingerprint", "ai_fingerprint", "human_fingerprint", "reference_fingerprint"):
        assert ours[key] == theirs[key], key  # the very run the pipeline made, uninterrupted
    assert ours["counts"] == theirs["counts"] and ours["counts"]["steps"] == 6
    rows, clean_rows = read_metrics(out), read_metrics(clean)
    assert [m["step"] for m in rows if "split" not in m] == list(range(1, 7))  # 3 steps x 2 epochs, no gap or repeat
    assert [m["step"] for m in rows if m.get("split") == "eval"] == [3, 6]
    for key, split in (("loss", None), ("accuracy", "eval"), ("mean_margin", "eval")):
        assert [m[key] for m in rows if m.get("split") == split] == pytest.approx(
            [m[key] for m in clean_rows if m.get("split") == split], rel=1e-4, abs=1e-5), key
    assert ours["reward_shift"] == pytest.approx(theirs["reward_shift"], rel=1e-4, abs=1e-6)
    resumed = load_file(str(out / "model" / "model.safetensors"))
    uninterrupted = load_file(str(clean / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)

def test_two_rank_zero3_run(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for stage in ("pm_pretrain", "pm_finetune"):
        result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29631", "-m", f"cai.stages.{stage}",
                                 *TINY_ARGS, f"run_dir={run_dir}", "deepspeed=zero3"], cwd=ROOT, capture_output=True,
                                text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        manifest = read_manifest(run_dir / stage)
        assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert read_manifest(run_dir / "pm_pretrain")["counts"]["steps"] == 6  # 18 pairs / (2 ranks x 4) -> 3 steps x 2 epochs
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "pm_finetune" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input_is_refused_and_earlier_outputs_stay_intact(tiny_run, tmp_path, process_group):
    """Each stage run in this process, as run_stage runs it: an InputError in one line (run_stage's exit 1,
    tests/test_bad_inputs.py) before anything is written."""
    from cai.errors import InputError

    pretrain, finetune = "pm_pretrain", "pm_finetune"

    def refused(stage: str, text: str, *overrides: str, run_dir=None) -> None:
        with pytest.raises(InputError) as e:
            _run_here(stage, run_dir or tmp_path / "run", *overrides)
        assert text in str(e.value) and "\n" not in str(e.value), str(e.value)

    run_dir = _copy(tiny_run, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "p_chosen": 2.0}) + "\n")
    before = outputs(run_dir)
    refused(pretrain, f"{bad}: row 0 'p_chosen' must be a number in [0, 1], got 2.0", f"pm_pretrain.source={bad}")
    refused(finetune, f"{bad}: row 0 'p_chosen'", f"pm_finetune.human_source={bad}")
    refused(finetune, "pm_finetune.human_fraction must be in [0, 1), got 1.0", "pm_finetune.human_fraction=1.0")
    refused(finetune, "pm_finetune.human_fraction=0.95 needs 76 human comparisons for 4 AI-labeled ones",
            "pm_finetune.human_fraction=0.95")
    refused(finetune, "pm_finetune.eval_fraction=0.9: 4 ai comparison(s) leave an empty training split",
            "pm_finetune.eval_fraction=0.9")
    refused(pretrain, "pm_pretrain.margin must be >= 0", "pm_pretrain.margin=-1")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}) + "\n")
    refused(pretrain, "no usable comparisons", f"pm_pretrain.source={same}")
    assert outputs(run_dir) == before
    refused(finetune, "ai_feedback: no ai_feedback here (no manifest.json); run that stage first", run_dir=tmp_path / "empty")


@pytest.mark.slow
def test_finetune_with_the_embedded_backbone(embedded_pm):
    """pm_finetune on SmolLM2-135M: AI labels from the embedded labeler, human pairs, CPU; writes accuracy, ECE, PNG."""
    out = embedded_pm / "pm_finetune"
    manifest = read_manifest(out)
    assert manifest["init"] == "embedded" and "no pm_pretrain" in (embedded_pm / "pm_finetune.stdout").read_text()
    assert manifest["counts"]["ai_pairs"] >= 4 and manifest["counts"]["human_pairs"] == manifest["counts"]["ai_pairs"]
    eval_row = [m for m in read_metrics(out) if m.get("split") == "eval"][-1]
    assert 0.0 <= eval_row["accuracy"] <= 1.0 and 0.0 <= eval_row["ece"] <= 1.0 and eval_row["pairs"] >= 2
    assert (out / "reliability.png").stat().st_size > 1000
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    reference = [json.loads(line)["messages"] for line in (embedded_pm / "reference.jsonl").read_text().splitlines()]
    assert score_conversations(model, tok, reference).mean().item() == pytest.approx(0.0, abs=1e-3)
