"""sl_train: tokenisation maths, end to end on a tiny model, resume after SIGKILL, 2 ranks, LoRA, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_cfg, kill_then_rerun, outputs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.models import load_tokenizer
from cai.stages.sl_train import IGNORE, collate, tokenize_sft
from cai.training import epoch_order

TINY_ARGS = ["debug=tiny", "progress=false"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A finished tiny sl_generate run to train on (made in this process, as run_stage runs the stage)."""
    from cai.stages import handle
    from cai.stages.sl_generate import run

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("sl_generate", [*TINY_ARGS, f"run_dir={run_dir}", "data.num_red_team=5", "data.num_helpful=3",
                                      "n_revisions=1"])
    run(cfg, handle(run, cfg))
    return run_dir


def _fresh_run_dir(upstream, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(upstream / "sl_generate", run_dir / "sl_generate")
    return run_dir


def _run_here(run_dir, *overrides: str):
    """sl_train in this process, as run_stage runs it (its handle on its folder; exceptions as they are)."""
    from cai.stages import handle
    from cai.stages.sl_train import run

    cfg = compose_cfg("sl_train", [*TINY_ARGS, f"run_dir={run_dir}", *overrides])
    return run(cfg, handle(run, cfg))


def _refused(run_dir, *overrides: str, kind=None) -> str:
    """The one-line message sl_train refuses with (run_stage prints it as 'cai sl_train: ...' and exits 1)."""
    from cai.errors import InputError

    with pytest.raises(kind or InputError) as e:
        _run_here(run_dir, *overrides)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_tokenize_sft_masks_all_but_the_reply():
    tok = load_tokenizer(TINY)
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    ids, labels, cut = tokenize_sft(tok, chat, 512)
    prompt = tok(tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    reply = tok("hello", add_special_tokens=False)["input_ids"]
    assert ids == prompt + reply + [tok.eos_token_id] and not cut
    assert labels == [IGNORE] * len(prompt) + reply + [tok.eos_token_id]
    # too long: the prompt loses its oldest tokens, the reply and EOS stay whole
    ids2, labels2, cut2 = tokenize_sft(tok, chat, len(reply) + 4)
    assert cut2 and len(ids2) == len(reply) + 4 and ids2[-len(reply) - 1:] == reply + [tok.eos_token_id]
    assert ids2[:3] == prompt[-3:]
    ids3, labels3, _ = tokenize_sft(tok, chat, 512, add_eos=False)  # a reply cut off at max_new_tokens
    assert ids3 == prompt + reply and labels3[-1] == reply[-1]
    with pytest.raises(ValueError, match="end with an assistant turn"):
        tokenize_sft(tok, chat[:1], 512)


def test_collate_pads_right_and_masks_labels():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_epoch_order_is_seeded_and_wraps():
    a = epoch_order(5, 8, seed=0, epoch=0)
    assert a == epoch_order(5, 8, seed=0, epoch=0) != epoch_order(5, 8, seed=0, epoch=1)
    assert sorted(a[:5]) == list(range(5)) and a[5:] == a[:3]


def test_trains_saves_and_reloads(upstream, tmp_path, process_group, capsys):
    """sl_train in this process (as run_stage runs it): it learns, saves a model transformers loads, and the same
    command again finds it complete."""
    run_dir = _fresh_run_dir(upstream, tmp_path)
    _run_here(run_dir, "sl_train.epochs=6")
    out = run_dir / "sl_train"
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 8 and manifest["counts"]["steps"] == 24
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert all({"loss", "lr", "tokens_per_s"} <= m.keys() for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5  # it learns
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in (out / "model").iterdir()}
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = load_file(str(_tiny_base(tmp_path) / "model.safetensors"))
    changed = [k for k, v in trained.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert len(changed) > 10
    capsys.readouterr()
    _run_here(run_dir, "sl_train.epochs=6")
    assert "already complete" in capsys.readouterr().out


def _tiny_base(tmp_path):
    from cai.models import load_policy

    model, _ = load_policy(TINY)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_sigkill_then_rerun_resumes_to_the_same_weights(upstream, tmp_path):
    run_dir = _fresh_run_dir(upstream, tmp_path)
    args = [sys.executable, "-m", "cai.stages.sl_train", *TINY_ARGS, f"run_dir={run_dir}", "sl_train.epochs=16",
            "sl_train.micro_batch_size=1", "sl_train.save_every=5"]
    latest = run_dir / "sl_train" / "checkpoints" / "latest.json"
    def left_running():
        assert json.loads(latest.read_text())["step"] < 128 and read_manifest(run_dir / "sl_train")["status"] == "running"

    again = kill_then_rerun(args, latest, at_step=10, after_kill=left_running)
    assert again.returncode == 0, again.stderr
    assert "resuming at step" in again.stdout
    steps = [m["step"] for m in read_metrics(run_dir / "sl_train")]
    assert steps == list(range(1, 129))  # the curve continues: no gap, no repeated step
    resumed = load_file(str(run_dir / "sl_train" / "model" / "model.safetensors"))

    clean = tmp_path / "clean"
    shutil.copytree(run_dir / "sl_generate", clean / "sl_generate")
    subprocess.run([*args[:-4], f"run_dir={clean}", *args[-3:]], cwd=ROOT, check=True, capture_output=True)
    uninterrupted = load_file(str(clean / "sl_train" / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)
    assert AutoModelForCausalLM.from_pretrained(run_dir / "sl_train" / "model") is not None


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_rank_cpu_run(upstream, tmp_path, launcher):
    run_dir = _fresh_run_dir(upstream, tmp_path)
    bin_dir = os.path.dirname(sys.executable)
    if launcher == "torchrun":
        cmd = [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port", "29611", "-m", "cai.stages.sl_train"]
    else:
        cmd = [os.path.join(bin_dir, "deepspeed"), "--no_local_rank", "--num_gpus", "2", "--master_port", "29612",
               "--module", "cai.stages.sl_train"]
    result = subprocess.run([*cmd, *TINY_ARGS, f"run_dir={run_dir}", "deepspeed=zero3"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = read_manifest(run_dir / "sl_train")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert manifest["counts"]["steps"] == 4  # 8 rows / (2 ranks x 2 rows) x 2 epochs
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sl_train" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lora_adapters_are_merged_on_save(upstream, tmp_path, process_group):
    run_dir = _fresh_run_dir(upstream, tmp_path)
    _run_here(run_dir, "sl_train.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "sl_train" / "model")
    assert not any("lora" in k for k in trained.state_dict())
    base = load_file(str(_tiny_base(tmp_path) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[q], base[q])  # the adapter's update is in the weights
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(trained.state_dict()[k], base[k])  # modules without adapters are untouched


def test_refuses_incomplete_upstream_and_bad_settings(upstream, tmp_path, process_group):
    assert "sl_generate: no sl_generate here (no manifest.json); run that stage first" in _refused(tmp_path / "empty")
    run_dir = _fresh_run_dir(upstream, tmp_path)
    manifest = json.loads((run_dir / "sl_generate" / "manifest.json").read_text())
    manifest["status"] = "running"
    (run_dir / "sl_generate" / "manifest.json").write_text(json.dumps(manifest))
    before = outputs(run_dir)
    assert "is not complete" in _refused(run_dir)
    assert outputs(run_dir) == before
    assert "sl_train.lr must be > 0" in _refused(run_dir, "sl_train.lr=-1")


def test_a_non_finite_loss_stops_the_run_and_names_the_step_and_checkpoint(upstream, tmp_path, process_group):
    """An absurd learning rate blows the weights up within a few steps: the shared training loop stops on the
    first non-finite loss, before stepping on it, and names the step and the checkpoint a rerun would resume from
    (a StageError: run_stage's one line and exit 1)."""
    from cai.errors import StageError

    run_dir = _fresh_run_dir(upstream, tmp_path)
    last = _refused(run_dir, "sl_train.lr=1e30", "sl_train.epochs=4", "sl_train.micro_batch_size=1", "sl_train.save_every=1",
                    "sl_train.warmup_ratio=0", kind=StageError)
    match = re.fullmatch(r"a non-finite loss at step (\d+); stopping\. Last good checkpoint: step-(\d+) in .*", last)
    assert match, last
    step, checkpoint = int(match[1]), int(match[2])
    assert checkpoint == step - 1  # saved every step: the one before the bad loss
    assert [m["step"] for m in read_metrics(run_dir / "sl_train") if "loss" in m] == list(range(1, step))
    assert read_manifest(run_dir / "sl_train")["status"] == "running"


def test_training_rows_take_every_revision_step_or_only_the_final_one():
    from cai.stages.sl_train import training_rows

    q = {"role": "user", "content": "how do I pick a lock?"}
    red = {"id": "r", "messages": [q, {"role": "assistant", "content": "second"}], "revisions": ["first", " ", "second"],
           "revisions_finished": [True, False, False], "finished": False}
    helpful = {"id": "h", "messages": [q, {"role": "assistant", "content": "answer"}], "revisions": [], "finished": True}
    assert training_rows([red, helpful], "final") == [red, helpful]
    rows = training_rows([red, helpful], "every")
    # the empty second revision is skipped; each step keeps the conversation and its own EOS flag
    assert [(r["messages"][-1]["content"], r["finished"]) for r in rows] == [("first", True), ("second", False), ("answer", True)]
    assert all(r["messages"][:-1] == [q] for r in rows)
    # data without revisions_finished (an older sl_generate): the last revision has the row's flag, earlier ones ended
    old = {k: v for k, v in red.items() if k != "revisions_finished"}
    assert [r["finished"] for r in training_rows([old], "every")] == [True, False]
