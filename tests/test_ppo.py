"""ppo end to end: learning a known preference, the PM pipeline on tiny models, resume, 2 ranks, bad input,
direct RLAIF, and a short run on the embedded SmolLM2 model."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, assert_one_line_error, copy_stages, kill_then_rerun, outputs, run_module
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.models import load_tokenizer

TINY_ARGS = ["debug=tiny", "progress=false"]
PPO_KEYS = {"score", "reward", "kl", "kl_coef", "response_length", "eos_rate", "policy_loss", "value_loss", "clip_frac",
            "value_clip_frac", "entropy", "approx_kl", "samples_per_s"}


def _copy(tiny_run, tmp_path, stages=("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune")):
    return copy_stages(tiny_run, tmp_path / "run", stages)


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """A tiny policy fine-tuned to babble four one-token words, and the id of the word " you"."""
    tmp_path = tmp_path_factory.mktemp("babbler")
    tok = load_tokenizer(TINY)
    words = [" the", " you", " to", " how"]
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids)  # each word is one token of the tiny vocabulary
    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": f"Say something number {i}."},
                          {"role": "assistant", "content": "".join(rng.choice(words) for _ in range(8)).strip()}]}
            for i in range(32)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "babble"))
    sft = run_module("cai.stages.sl_train", *TINY_ARGS, f"run_dir={tmp_path / 'sft'}", f"sl_train.dataset={tmp_path / 'babble'}",
                     "sl_train.epochs=30", "sl_train.lr=3e-3", "sl_train.micro_batch_size=8")
    assert sft.returncode == 0, sft.stderr[-2000:]
    return tmp_path / "sft" / "sl_train" / "model", ids[1][0]


@pytest.mark.parametrize("algorithm, prompts, ratio", [("ppo", 8, "token"), ("rloo", 2, "token"), ("rloo", 2, "sequence"),
                                                       ("grpo", 2, "token"), ("dr_grpo", 2, "token"), ("reinforce", 8, "token"),
                                                       ("online_dpo", 4, "token")])
def test_each_algorithm_learns_to_prefer_a_token(babbler, tmp_path, algorithm, prompts, ratio):
    """The reward is the share of one word (" you") in the response: 8 responses a step for every algorithm (the
    critic-free ones as 2 prompts x 4, online DPO as 4 pairs labelled sigma(score difference)); rloo also with one
    importance ratio per response (``ppo.rloo_ratio=sequence``)."""
    critic = algorithm in ("ppo", "reinforce")
    model, token = babbler
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={tmp_path / 'rl'}", "ppo.reward=custom",
                        f"ppo.reward_fn={{_target_:tests.ppo_rewards.share_of_token,token:{token}}}",
                        f"ppo.policy={model}", "ppo.steps=12", "ppo.temperature=1.0", f"ppo.algorithm={algorithm}",
                        "ppo.lr=3e-4", f"ppo.batch_size={prompts}", "ppo.ppo_epochs=4", "ppo.missing_eos_penalty=0",
                        f"ppo.rloo_ratio={ratio}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "rl" / "ppo")
    scores = [m["score"] for m in metrics]
    assert len(scores) == 12
    first, last = scores[0], sum(scores[-4:]) / 4
    assert last > first + 0.1, scores  # about 0.12 of the tokens at the start
    assert ("value_loss" in metrics[0]) == critic and ("group_score_std" in metrics[0]) == (not critic)
    assert ("kl_loss" in metrics[0]) == (algorithm in ("grpo", "dr_grpo"))
    manifest = read_manifest(tmp_path / "rl" / "ppo")
    k = 1 if critic else 2 if algorithm == "online_dpo" else 4
    assert manifest["algorithm"] == algorithm and manifest["counts"]["samples_per_prompt"] == k
    assert ("value" in manifest["devices"]) == critic


def test_a_non_finite_reward_stops_the_run_and_names_the_step_and_checkpoint(tmp_path):
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={tmp_path}", "ppo.steps=4", "ppo.save_every=2",
                        "ppo.reward=custom", "ppo.reward_fn={_target_:tests.ppo_rewards.nan_on_call,call:3}")
    assert_one_line_error(result, "a non-finite reward (score) at step 3; stopping before any update on it. "
                                  "Last good checkpoint: step-00000002")
    assert [m["step"] for m in read_metrics(tmp_path / "ppo")] == [1, 2]  # nothing logged or trained on the NaN
    assert read_manifest(tmp_path / "ppo")["status"] == "running"  # not complete: a rerun resumes at step 2


def test_ppo_against_the_tiny_pm(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "ppo"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(PPO_KEYS <= m.keys() for m in metrics)
    assert metrics[0]["kl"] == 0.0  # the policy starts as the reference: no KL before its first update
    assert all(0 < m["response_length"] <= 12 and 0 <= m["clip_frac"] <= 1 for m in metrics)
    samples = read_metrics(out, "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 4, 4] and all(s["prompt"] and "score" in s for s in samples)
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["policy"] == str(run_dir / "sl_train" / "model")
    assert manifest["reward"] == "pm" and {"score_first", "score_last", "kl_last"} <= manifest["summary"].keys()
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(run_dir / "sl_train" / "model")
    assert not torch.equal(policy.lm_head.weight, start.lm_head.weight)
    assert "already complete" in run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}").stdout
    rerun = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.kl_coef=0.2", "progress=true")
    assert rerun.returncode == 0 and "already complete" not in rerun.stdout
    metrics = read_metrics(out)
    assert metrics[0]["kl_coef"] == 0.2
    # every render of the progress bar shows the values of the step it counts, not the step before
    shown = [(int(n), float(score)) for n, score in re.findall(r"(\d+)/4 \[[^\]]*score=([-\d.]+)", rerun.stderr)]
    assert shown and all(score == pytest.approx(metrics[n - 1]["score"], abs=5e-4) for n, score in shown), shown


@pytest.mark.parametrize("missing_eos", ["ppo.missing_eos_penalty=1.0", "ppo.missing_eos_score=-1.0"])
def test_every_response_hitting_max_length_still_trains(tiny_run, tmp_path, missing_eos):
    run_dir = _copy(tiny_run, tmp_path)
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.max_new_tokens=1", "ppo.steps=2",
                        "ppo.kl_estimator=k3", "ppo.target_kl=0.1", "ppo.whiten_rewards=true", missing_eos)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir / "ppo")
    assert all(m["response_length"] == 1 for m in metrics)
    if any(m["eos_rate"] == 0 for m in metrics):
        assert "no response ended within ppo.max_new_tokens=1" in result.stderr + result.stdout
    assert all(torch.isfinite(torch.tensor([m["policy_loss"], m["value_loss"]])).all() for m in metrics)
    if missing_eos == "ppo.missing_eos_score=-1.0":  # step 1: no response ended, so each scored exactly -1 (PM unread)
        first = metrics[0]
        assert first["eos_rate"] == 0.0 and first["reward"] == pytest.approx(-1.0 - first["kl_coef"] * first["kl"], abs=1e-4)
        assert "each scored missing_eos_score=-1.0" in result.stderr + result.stdout


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "reinforce", "online_dpo"])
def test_sigkill_then_rerun_resumes_to_the_same_weights(tiny_run, tmp_path, algorithm):
    """rloo resumes as grpo does (no value model, group advantages); online DPO is labelled by the tiny labeler
    (``reward=pairwise``: principles drawn per prompt and step, so a resumed step draws what the clean run drew)."""
    run_dir = _copy(tiny_run, tmp_path)
    args = [sys.executable, "-m", "cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.steps=10", "ppo.save_every=3",
            "ppo.target_kl=0.5", f"ppo.algorithm={algorithm}", f"ppo.batch_size={4 if algorithm in ('ppo', 'reinforce') else 2}",
            *(["ppo.reward=pairwise", "ppo.dpo_loss=soft"] if algorithm == "online_dpo" else [])]
    latest = run_dir / "ppo" / "checkpoints" / "latest.json"
    again = kill_then_rerun(args, latest, at_step=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout
    assert [m["step"] for m in read_metrics(run_dir / "ppo")] == list(range(1, 11))
    resumed = load_file(str(run_dir / "ppo" / "model" / "model.safetensors"))
    clean = _copy(tiny_run, tmp_path / "clean")
    subprocess.run([*args[:5], f"run_dir={clean}", *args[6:]], cwd=ROOT, check=True, capture_output=True)
    uninterrupted = load_file(str(clean / "ppo" / "model" / "model.safetensors"))
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)
    kl_resumed = [m["kl_coef"] for m in read_metrics(run_dir / "ppo")]
    assert kl_resumed == [m["kl_coef"] for m in read_metrics(clean / "ppo")]  # the KL controller was restored too


@pytest.mark.parametrize("algorithm, port", [("ppo", 29641), ("grpo", 29643)])
def test_two_rank_zero3_run(tiny_run, tmp_path, algorithm, port):
    """grpo: each rank's groups share their prompt's pass (a repeated KV cache) with the weights partitioned."""
    run_dir = _copy(tiny_run, tmp_path)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "cai.stages.ppo", *TINY_ARGS,
                             f"run_dir={run_dir}", "deepspeed=zero3", "ppo.steps=2", f"ppo.algorithm={algorithm}",
                             "ppo.batch_size=2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = read_manifest(run_dir / "ppo")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert len(read_metrics(run_dir / "ppo")) == 2
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "model")
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_direct_rlaif_needs_no_pm(tmp_path):
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={tmp_path}", "ppo.reward=direct_rlaif", "ppo.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ppo")
    assert manifest["reward"] == "direct_rlaif" and manifest["constitution_hash"] and manifest["policy"] == "tiny-random"
    assert all(-1.0 <= m["score"] <= 1.0 for m in read_metrics(tmp_path / "ppo"))


def test_pairwise_labeler_reward_within_each_group(tmp_path):
    """The labeler compares the k = 3 responses to each prompt two by two: each one's mean win rate, in [0, 1]."""
    result = run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={tmp_path}", "ppo.reward=pairwise", "ppo.algorithm=rloo",
                        "ppo.samples_per_prompt=3", "ppo.batch_size=2", "ppo.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ppo")
    assert manifest["reward"] == "pairwise" and manifest["reward_fingerprint"].startswith("pairwise:1:")
    assert manifest["roles"]["labeler"]["model"] and "labeler" in manifest["devices"]
    assert all(0.0 <= m["score"] <= 1.0 for m in read_metrics(tmp_path / "ppo"))
    # win rates within a group average exactly 1/2 (each comparison hands out one win): the mean score says so
    assert all(m["score"] == pytest.approx(0.5, abs=1e-5) for m in read_metrics(tmp_path / "ppo"))


@pytest.mark.parametrize("override, message", [
    ("ppo.kl_coef=-0.1", "ppo.kl_coef (beta) must be >= 0, got -0.1"),
    ("ppo.batch_size=3", "ppo.batch_size=3 must be divisible by ppo.num_minibatches=2"),
    ("ppo.algorithm=reinforce_pp", "ppo.algorithm must be one of ppo, rloo, grpo, dr_grpo, reinforce, online_dpo, got 'reinforce_pp'"),
    ("ppo.algorithm=reinforce ppo.kl_coef=1.5", "ppo.algorithm=reinforce weighs the score by 1 - ppo.kl_coef: ppo.kl_coef must "
                                                "be in [0, 1], got 1.5"),
    ("ppo.algorithm=reinforce ppo.kl_in=loss", "ppo.algorithm=reinforce weighs the KL against the score in the reward (RLAIF): "
                                               "ppo.kl_in must be reward or null"),
    ("ppo.algorithm=grpo ppo.samples_per_prompt=1",
     "ppo.algorithm=grpo measures each response against the other responses to its prompt: ppo.samples_per_prompt must be >= 2"),
    ("ppo.samples_per_prompt=0", "ppo.samples_per_prompt must be an integer >= 1 or null, got 0"),
    ("ppo.algorithm=rloo ppo.rloo_ratio=response", "ppo.rloo_ratio must be token or sequence, got 'response'"),
    ("ppo.algorithm=grpo ppo.rloo_ratio=sequence", "ppo.rloo_ratio=sequence is RLOO's one ratio per response: it needs "
                                                   "ppo.algorithm=rloo, got grpo"),
    ("ppo.kl_in=both", "ppo.kl_in must be reward, loss or null"),
    ("ppo.reward=pairwise", "ppo.reward=pairwise compares the responses to one prompt with each other: ppo.samples_per_prompt"),
    ("ppo.pairwise_principles=0", "ppo.pairwise_principles must be an integer >= 1, got 0"),
    ("ppo.missing_eos_score=low", "ppo.missing_eos_score must be a number or null, got 'low'"),
    ("ppo.reward=oracle", "ppo.reward must be one of pm, direct_rlaif"),
    ("ppo.kl_estimator=k2", "ppo.kl_estimator must be k1 or k3"),
    ("ppo.lam=1.5", "ppo.gamma and ppo.lam must be in [0, 1]"),
    ("ppo.temperature=0", "ppo.temperature must be > 0"),
    ("ppo.reward_fn={_target_:tests.ppo_rewards.share_of_token}", "ppo.reward_fn is set but ppo.reward=pm; set ppo.reward=custom"),
])
def test_bad_settings_are_named(override, message):
    from conftest import compose_cfg

    from cai.errors import StageInputError
    from cai.stages.ppo import _check_settings

    with pytest.raises(StageInputError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        _check_settings(compose_cfg("ppo", [*TINY_ARGS, *override.split()]).ppo)


def test_bad_input_is_refused_and_earlier_outputs_stay_intact(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    before = outputs(run_dir)
    assert_one_line_error(run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.kl_coef=-0.1"),
                    "ppo.kl_coef (beta) must be >= 0, got -0.1")
    assert_one_line_error(run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.max_prompt_length=5"),
                    "every prompt is longer than ppo.max_prompt_length=5 tokens")
    assert_one_line_error(run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", "ppo.max_prompt_length=2040"),
                    "exceeds the policy's context of 2048 tokens")
    # a PM on another tokenizer (a different vocabulary) is refused
    from cai.models import load_preference_model

    pm, pm_tok = load_preference_model({**TINY, "tiny": {**TINY["tiny"], "vocab_size": 600}})
    pm.save_pretrained(tmp_path / "other-pm")
    pm_tok.save_pretrained(tmp_path / "other-pm")
    assert_one_line_error(run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={run_dir}", f"ppo.reward_model={tmp_path / 'other-pm'}"),
                    "the PM's tokenizer differs from the policy's")
    assert outputs(run_dir) == before
    assert_one_line_error(run_module("cai.stages.ppo", *TINY_ARGS, f"run_dir={tmp_path / 'empty'}"),
                    "pm_finetune: no pm_finetune here (no manifest.json); run that stage first")


@pytest.mark.slow
def test_short_ppo_run_with_the_embedded_model(embedded_pm, tmp_path):
    """SmolLM2-135M as policy, reference, PM backbone and value model on CPU, against the PM that pm_finetune
    trained on the embedded labeler's labels: a few PPO steps, every metric finite, KL bounded."""
    run_dir = copy_stages(embedded_pm, tmp_path / "run", ["pm_finetune"])
    result = run_module("cai.stages.ppo", f"run_dir={run_dir}", "progress=false", "ppo.steps=2", "ppo.batch_size=4",
                        "ppo.ppo_epochs=1", "ppo.max_new_tokens=16", "ppo.num_prompts=8", "ppo.lr=1e-6")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir / "ppo")
    assert len(metrics) == 2 and all(PPO_KEYS <= m.keys() for m in metrics)
    assert all(torch.isfinite(torch.tensor([m[k] for k in PPO_KEYS])).all() for m in metrics)
    assert metrics[0]["kl"] == 0.0 and all(abs(m["kl"]) < 5.0 for m in metrics)
    assert AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "model") is not None
