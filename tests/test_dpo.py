"""The DPO stage: its pairs and log-probs by hand, each loss learning a toy preference, resume after SIGKILL, 2 ranks
under ZeRO-3, the Hugging Face recipe's revision pairs, bad input. The pipeline's own dpo run is ``tiny_run``'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_cfg, copy_stages, file_stamps, kill_then_rerun, outputs
from datasets import Dataset
from safetensors.torch import load_file

from cai.errors import InputError
from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.models import load_policy
from cai.preference import Comparison
from cai.stages import handle
from cai.stages.dpo import encode_pairs, pair_logps, revision_pairs
from cai.stages.dpo import run as dpo_run

TINY_ARGS = ["debug=tiny", "progress=false"]


def _run(tmp_path, *overrides: str):
    cfg = compose_cfg("dpo", [*TINY_ARGS, f"run_dir={tmp_path / 'run'}", *overrides])
    return dpo_run(cfg, handle(dpo_run, cfg))


def _pair(prompt: str, chosen: str, rejected: str, p: float = 1.0) -> Comparison:
    return Comparison("x", ({"role": "user", "content": prompt},), chosen, rejected, p)


@pytest.fixture(scope="module")
def tiny():
    return load_policy({**TINY, "device": "cpu"})


def test_pair_logps_equal_each_reply_scored_alone(tiny):
    """The shared prompt (one pass, its KV cache used by both replies) gives each reply's summed log-prob (EOS included)
    as a plain forward pass of prompt + that reply does."""
    model, tok = tiny
    pairs, _ = encode_pairs(tok, [_pair("Tell me a story.", "Once upon a time.", "No."),
                                  _pair("Hi", "Hello there, how can I help today?", "Hey")], 256, "here")
    got = pair_logps(model, pairs, tok.pad_token_id)
    assert got.shape == (2, 2)
    for row, pair in enumerate(pairs):
        for col, reply in enumerate((pair.chosen, pair.rejected)):
            ids = torch.tensor([pair.prompt + reply])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(pair.prompt) - 1:-1].float(), dim=-1)
            want = logp.gather(-1, torch.tensor(reply).unsqueeze(-1)).sum()
            assert got[row, col].item() == pytest.approx(want.item(), abs=1e-4)


def test_encode_pairs_cut_the_prompt_and_drop_a_reply_that_does_not_fit(tiny):
    model, tok = tiny
    long_prompt = _pair("word " * 80, "short", "also short")
    long_reply = _pair("q", "a " * 200, "b")
    pairs, counts = encode_pairs(tok, [long_prompt, long_reply], 64, "here")
    assert len(pairs) == 1 and counts == {"truncated_context": 1, "dropped_too_long": 1}
    assert len(pairs[0].prompt) + max(len(pairs[0].chosen), len(pairs[0].rejected)) == 64
    assert pairs[0].chosen[-1] == tok.eos_token_id
    with pytest.raises(InputError, match="here: every pair has a reply of max_length=8 tokens or more; raise dpo.max_length"):
        encode_pairs(tok, [long_reply], 8, "here")


def test_revision_pairs_take_the_final_revision_over_the_answer():
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "better"}],
             "initial_response": "bad", "revisions": ["good", "better", " "]},
            {"id": "h1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "initial_response": "a", "revisions": []},
            {"id": "r2", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "same"}],
             "initial_response": "same", "revisions": ["same"]}]
    pairs, dropped = revision_pairs(rows)
    assert [(p.id, p.prompt, p.chosen, p.rejected, p.p_chosen) for p in pairs] == [
        ("r1", ({"role": "user", "content": "q"},), "better", "bad", 1.0)]
    assert dropped == 2


def _toy(path, n: int, seed: int, p: float) -> str:
    """Pairs whose chosen reply always agrees and whose rejected one always refuses, with label ``p``."""
    import random

    rng = random.Random(seed)
    topics = ["the sea", "a cat", "bread", "trains", "rain", "music", "a map", "tea", "snow", "a bridge", "clocks", "bees"]
    rows = [{"prompt": f"Tell me about {rng.choice(topics)} {i}.", "chosen": "Yes, gladly: here it is.",
             "rejected": "No. I will not.", "p_chosen": p} for i in range(n)]
    Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("loss, p", [("sigmoid", 1.0), ("ipo", 1.0), ("soft", 0.8)])
def test_each_loss_learns_a_toy_preference(loss, p, tmp_path, process_group):
    """The implicit-reward margin starts at 0 (policy = reference) and grows, on the training pairs and the held-out
    ones. IPO pulls beta * h to its target 1/2 (h = 1 / (2 beta)); soft, on pairs labelled 0.8, to log 4 = 1.39."""
    data = _toy(tmp_path / "toy", 20, 0, p)
    _run(tmp_path, f"dpo.pairs={data}", f"dpo.loss={loss}", "dpo.eval_fraction=0.2", "dpo.epochs=3", "dpo.micro_batch_size=4",
         "dpo.lr=1e-3", "dpo.save_every=100")
    rows = read_metrics(tmp_path / "run" / "dpo")
    train = [m for m in rows if "split" not in m]
    evals = [m for m in rows if m.get("split") == "eval"]
    assert len(train) == 12 and len(evals) == 3 and evals[-1]["pairs"] == 4
    assert train[0]["margin"] == 0.0 and train[0]["confidence"] == pytest.approx(p)
    assert train[-1]["margin"] > 0.3 and evals[-1]["margin"] > 0.3 and evals[-1]["accuracy"] == 1.0
    assert evals[-1]["margin"] > evals[0]["margin"] > 0
    manifest = read_manifest(tmp_path / "run" / "dpo")
    assert manifest["status"] == "complete" and manifest["loss"] == loss and manifest["counts"]["train_pairs"] == 16


def test_auto_loss_is_soft_for_soft_labels_and_sigmoid_for_hard_ones(tiny_run):
    """tiny_run's dpo trained on ai_feedback's soft labels; the recipe's revision pairs are hard."""
    manifest = read_manifest(tiny_run / "dpo")
    assert manifest["loss"] == "soft" and manifest["pairs_source"].endswith("ai_feedback/dataset")
    assert manifest["counts"]["world_size"] == 1 and (tiny_run / "dpo" / "model" / "model.safetensors").exists()


def test_the_hf_recipe_pairs_run_without_a_labeler(tiny_run, tmp_path, process_group):
    copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train"))
    _run(tmp_path, "dpo.pairs=revisions", "dpo.eval_fraction=0.5")
    manifest = read_manifest(tmp_path / "run" / "dpo")
    assert manifest["loss"] == "sigmoid" and manifest["pairs_source"].endswith("sl_generate/dataset")
    assert manifest["counts"]["pairs"] == 4  # debug=tiny: 4 red-team rows, each revised; the helpful rows are dropped
    assert manifest["counts"]["unrevised_rows"] == 4


def test_sigkill_then_rerun_resumes_to_the_same_weights(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train", "ai_feedback"))
    args = [sys.executable, "-m", "cai.stages.dpo", *TINY_ARGS, f"run_dir={run_dir}", "dpo.epochs=10", "dpo.save_every=4"]
    out = run_dir / "dpo"
    kept = {}
    again = kill_then_rerun(args, out / "checkpoints" / "latest.json", at_step=8,
                            after_kill=lambda: kept.update(file_stamps(out, "reference_logps.pt")))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout
    assert kept and file_stamps(out, "reference_logps.pt") == kept  # the reference pass is not run again
    assert [m["step"] for m in read_metrics(out) if "split" not in m] == list(range(1, 21))  # 2 steps x 10 epochs
    clean = tmp_path / "clean"
    copy_stages(tiny_run, clean, ("sl_generate", "sl_train", "ai_feedback"))
    subprocess.run([*args[:5], f"run_dir={clean}", *args[6:]], cwd=ROOT, check=True, capture_output=True)
    resumed = load_file(str(out / "model" / "model.safetensors"))
    uninterrupted = load_file(str(clean / "dpo" / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_two_rank_zero3_run(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train", "ai_feedback"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29637", "-m", "cai.stages.dpo", *TINY_ARGS,
                             f"run_dir={run_dir}", "deepspeed=zero3"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = read_manifest(run_dir / "dpo")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert manifest["counts"]["steps"] == 2  # 3 training pairs / (2 ranks x 2) -> 1 step x 2 epochs
    # each rank computed the reference log-probs of its share; together they are the one-rank run's
    torch.testing.assert_close(torch.load(run_dir / "dpo" / "reference_logps.pt"),
                               torch.load(tiny_run / "dpo" / "reference_logps.pt"), rtol=1e-5, atol=1e-4)


def test_bad_input_is_refused_before_anything_is_written(tiny_run, tmp_path, process_group):
    run_dir = copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train", "ai_feedback"))
    before = outputs(run_dir)

    def refused(message: str, *overrides: str) -> None:
        with pytest.raises(InputError) as e:
            _run(tmp_path, *overrides)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    def jsonl(name: str, rows: list[dict]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    no_rejected = jsonl("no_rejected.jsonl", [{"prompt": "q", "chosen": "a"}])
    refused(f"{no_rejected}: format pairs needs columns chosen, prompt, rejected", f"dpo.pairs={no_rejected}")
    far = jsonl("far.jsonl", [{**pair, "p_chosen": 1.5}])
    refused(f"{far}: row 0 'p_chosen' must be a number in [0, 1], got 1.5", f"dpo.pairs={far}")
    nan = jsonl("nan.jsonl", [{**pair, "p_chosen": 0.5}, {**pair, "p_chosen": float("nan")}])
    refused(f"{nan}: row 1 'p_chosen' must be a number in [0, 1], got nan", f"dpo.pairs={nan}")
    empty = tmp_path / "empty"
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(empty))
    refused(f"{empty}: no rows", f"dpo.pairs={empty}")
    refused("dpo.beta must be > 0, got 0", "dpo.beta=0")
    refused("dpo.beta must be > 0, got -0.1", "dpo.beta=-0.1")
    refused("dpo.loss must be auto, sigmoid, ipo, soft; got 'hinge'", "dpo.loss=hinge")
    refused("every pair has a reply of max_length=3 tokens or more; raise dpo.max_length", "dpo.max_length=3")
    other = tmp_path / "other"  # a checkpoint of another tokenizer (the tiny labeler's, vocab 384)
    model, tok = load_policy({**TINY, "device": "cpu", "tiny": {**TINY["tiny"], "seed": 1, "vocab_size": 384}})
    model.save_pretrained(other)
    tok.save_pretrained(other)
    refused(f"dpo.reference={other}: its tokenizer differs from the policy's", f"dpo.reference={other}")
    refused("dpo.reference='nowhere': not a checkpoint folder", "dpo.reference=nowhere")
    assert outputs(run_dir) == before
