"""ai_feedback and label_alignment end to end on tiny models; TRL can train on the output unchanged; a killed
ai_feedback resumes to the rows of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, compose_cfg, copy_stages, file_stamps, kill_when, torchrun
from datasets import load_from_disk

from cai.constitution import load_constitution
from cai.errors import InputError, StageError
from cai.feedback import read_human_pairs
from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.stages import handle
from cai.stages.ai_feedback import run as feedback_run
from cai.stages.label_alignment import run as alignment_run
from cai.stages.sl_generate import run as sl_run

TINY = ["debug=tiny", "progress=false"]
COMPARISON_IDS = {p.id for p in load_constitution(ROOT / "constitutions" / "default").comparison}


@pytest.fixture(scope="module")
def feedback(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("ai_feedback", [*TINY, f"run_dir={run_dir}", "ai_feedback.n_principles=2", "ai_feedback.num_prompts=5"])
    return run_dir, load_from_disk(str(run_feedback(cfg)))


def test_rows_carry_soft_labels_and_evidence(feedback):
    run_dir, ds = feedback
    assert len(ds) == 5 and len(set(ds["id"])) == 5
    for row in ds:
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert {row["chosen"][0]["content"], row["rejected"][0]["content"]} == {row["response_a"], row["response_b"]}
        assert 0.5 <= row["p_chosen"] <= 1.0
        assert len(row["p_order_ab"]) == len(row["p_order_ba"]) == len(row["principle_ids"]) == 2
        assert set(row["principle_ids"]) <= COMPARISON_IDS and row["rationale"] == []
        p_a = sum((x + y) / 2 for x, y in zip(row["p_order_ab"], row["p_order_ba"])) / 2
        expected_chosen = row["response_a"] if p_a >= 0.5 else row["response_b"]
        assert row["chosen"][0]["content"] == expected_chosen
        assert row["p_chosen"] == pytest.approx(max(p_a, 1 - p_a))
    manifest = read_manifest(run_dir / "ai_feedback")
    assert manifest["status"] == "complete" and manifest["counts"]["pairs"] == 5 and manifest["policy"] == "tiny-random"
    # debug=tiny: the labeler is another tiny model (another seed and vocabulary) than the policy that sampled
    assert {r: m["model"] for r, m in manifest["roles"].items()} == {"policy": "tiny-random (seed 0, vocab 512)",
                                                                    "labeler": "tiny-random (seed 1, vocab 384)"}


def test_prompts_differ_from_the_sl_ones(feedback, tmp_path):
    _, ds = feedback
    run_sl(tmp_path)
    assert not set(load_from_disk(str(tmp_path / "sl_generate" / "dataset"))["prompt"]) & {r["prompt"][0]["content"] for r in ds}


def test_prompts_can_be_the_sl_ones(tmp_path):
    """ai_feedback.prompts=sl: a comparison for each SL-CAI prompt (CAI); evaluate counts them as training prompts."""
    from cai.stages.evaluate import _overlap_with_training

    run_sl(tmp_path)
    cfg = compose_cfg("ai_feedback", [*TINY, f"run_dir={tmp_path}", "ai_feedback.prompts=sl", "ai_feedback.num_prompts=4"])
    ds = load_from_disk(str(run_feedback(cfg)))
    sl_prompts = set(load_from_disk(str(tmp_path / "sl_generate" / "dataset"))["prompt"])
    assert {r["prompt"][0]["content"] for r in ds} == sl_prompts  # debug=tiny: SL used 4 red-team prompts
    from cai.data import prompt_order

    order = prompt_order(None, "prompt", "red_team", 0)
    eval_cfg = compose_cfg("evaluate", [*TINY, f"run_dir={tmp_path}"])
    assert _overlap_with_training(eval_cfg, order[:6]) == 4  # SL's 4, not SL's 4 + the 4 after them


def test_trl_reward_trainer_takes_the_output_unchanged(feedback, tmp_path):
    from conftest import TINY as TINY_MODEL
    from trl import RewardConfig, RewardTrainer

    from cai.models import load_preference_model

    _, ds = feedback
    model, tok = load_preference_model(TINY_MODEL)
    tok.padding_side = "right"
    args = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                        use_cpu=True, max_length=256, save_strategy="no", disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert {"chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    assert trainer.train().training_loss > 0


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    # greedy sampling gives identical pairs: every one is skipped, and a run with nothing left says so
    cfg = compose_cfg("ai_feedback", [*TINY, f"run_dir={tmp_path}", "ai_feedback.temperature=0", "ai_feedback.num_prompts=3"])
    assert "all 3 response pairs were identical: nothing to label" in refused(cfg, StageError)
    assert [json.loads(x)["skipped_identical"] for x in (tmp_path / "ai_feedback" / "metrics.jsonl").read_text().splitlines()] == [2, 1]


def test_uses_the_sl_model_when_it_exists(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", ["sl_train"])  # a complete SL-CAI model, nothing else
    run_feedback(compose_cfg("ai_feedback", [*TINY, f"run_dir={run_dir}", "ai_feedback.num_prompts=2"]))
    assert read_manifest(run_dir / "ai_feedback")["policy"] == str(run_dir / "sl_train" / "model")


# 16 prompts in 8 shards of 2, sampled by tiny_run's SL model
RESUMABLE = ["ai_feedback.num_prompts=16", "ai_feedback.shard_size=2"]


def _feedback_args(run_dir) -> list[str]:
    return [sys.executable, "-m", "cai.stages.ai_feedback", *TINY, f"run_dir={run_dir}", *RESUMABLE]


@pytest.fixture(scope="module")
def uninterrupted_feedback(tiny_run, tmp_path_factory) -> list[dict]:
    """The rows of an uninterrupted run on two ranks (torchrun), each labeling its half of the shards: the runs on one
    process below end with these very rows."""
    run_dir = copy_stages(tiny_run, tmp_path_factory.mktemp("uninterrupted"), ["sl_train"])
    result = subprocess.run(torchrun(*_feedback_args(run_dir)[1:]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(run_dir / "ai_feedback")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    return load_from_disk(str(run_dir / "ai_feedback" / "dataset")).to_list()


@pytest.mark.parametrize("at_shard", [1, 6])
def test_sigkill_then_rerun_resumes(tiny_run, tmp_path, uninterrupted_feedback, at_shard):
    """Killed once ``at_shard`` of the 8 shards are finished (early, late), the same command finishes the rest:
    finished shards kept as they were, and the rows of an uninterrupted run: none lost, none twice."""
    run_dir = copy_stages(tiny_run, tmp_path, ["sl_train"])
    out = run_dir / "ai_feedback"
    shards = out / "shards"

    def finished() -> list[str]:  # a shard is finished once its record (shard-K.json) is written, after its rows
        return sorted(p.stem for p in shards.glob("shard-*.json"))

    kill_when(_feedback_args(run_dir), lambda: len(finished()) >= at_shard)
    done = finished()
    assert at_shard <= len(done) < 8 and read_manifest(out)["status"] == "running"
    kept = {k: v for k, v in file_stamps(shards).items() if k.split("/")[0].removesuffix(".json") in done}
    assert len(kept) > len(done)  # each finished shard: its record and its dataset's files

    again = subprocess.run(_feedback_args(run_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming, {len(done)}/8 shards already done" in again.stdout
    after = file_stamps(shards)
    assert {k: after.get(k) for k in kept} == kept  # not labeled again
    ds = load_from_disk(str(out / "dataset"))
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["shards"] == 8
    assert len(set(ds["id"])) == len(ds) == 16 - manifest["counts"]["skipped_identical_responses"]
    assert ds.to_list() == uninterrupted_feedback
    # a shard's metrics row is written after its record: the rerun logs each shard it labels, once
    logged = [m["shard"] for m in read_metrics(out)]
    assert logged == sorted(set(logged)) and {k for k in range(8) if f"shard-{k:05d}" not in done} <= set(logged)


@pytest.mark.parametrize("extra, message", [
    (["ai_feedback.n_principles=0"], "ai_feedback.n_principles must be >= 1"),
    (["ai_feedback.principle_ids=[nope]"], "no comparison principle 'nope'"),
    (["ai_feedback.cot_clamp=[0.7,0.2]"], "cot_clamp must be [low, high]"),
    (["ai_feedback.prompts=new"], "ai_feedback.prompts must be after_sl or sl, got 'new'"),
])
def test_bad_settings(tmp_path, extra, message):
    assert message in refused(compose_cfg("ai_feedback", [*TINY, f"run_dir={tmp_path}", *extra]))
    assert not (tmp_path / "ai_feedback" / "manifest.json").exists()


def test_template_without_options_is_refused(tmp_path):
    import shutil

    shutil.copytree(ROOT / "constitutions" / "default", tmp_path / "c")
    (tmp_path / "c" / "comparison.j2").write_text("{{ principle.text }}\n")
    cfg = compose_cfg("ai_feedback", [*TINY, f"run_dir={tmp_path}", f"constitution.path={tmp_path / 'c'}"])
    assert "comparison.j2:1: the comparison template must use {{ options }}" in refused(cfg)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_hh_and_own_format_and_counts_skips(tmp_path):
    hh = _write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: only a question"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
         "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"},
    ])
    pairs, skipped = read_human_pairs(hh)
    assert [(p.response_a, p.response_b) for p in pairs] == [("hello there", "go away"), ("good", "bad")]
    assert [m["role"] for m in pairs[1].conversation] == ["user", "assistant", "user"]
    assert skipped == {"no_assistant_turn": 1, "identical_responses": 1}
    own = _write_jsonl(tmp_path / "own.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                                 "chosen": [{"role": "assistant", "content": "x"}],
                                                 "rejected": [{"role": "assistant", "content": "y"}]}])
    assert read_human_pairs(own)[0][0].response_a == "x"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "x"}])
    cfg = compose_cfg("label_alignment", [*TINY, f"run_dir={tmp_path}", f"pairs={bad}"])
    assert f"{bad}:1: needs 'chosen' and 'rejected'" in refused(cfg, run=alignment_run)


def test_label_alignment_on_hh_rlhf(shared_data, tmp_path):
    cfg = compose_cfg("label_alignment", [*TINY, f"run_dir={tmp_path}", "limit=12", "ai_feedback.n_principles=2",
                                          f"pairs={shared_data / 'hh-rlhf' / 'harmless-base-test-first300.jsonl'}"])
    metrics = run_alignment(cfg)
    saved = json.loads((tmp_path / "label_alignment" / "metrics.json").read_text())
    assert saved["n"] == 12 and {"alignment", "position_bias_rate", "same_position_preferred", "mean_confidence"} <= saved.keys()
    assert 0 <= saved["alignment"] <= 1 and saved["per_principle"]
    assert metrics["alignment"] == saved["alignment"]


@pytest.mark.slow
def test_label_alignment_with_the_embedded_labeler(shared_data, tmp_path, capsys):
    run_alignment(compose_cfg("label_alignment", [f"run_dir={tmp_path}", "limit=16", "progress=false",
                                                  f"pairs={shared_data / 'hh-rlhf' / 'harmless-base-test-first300.jsonl'}"]))
    metrics = json.loads((tmp_path / "label_alignment" / "metrics.json").read_text())
    assert metrics["n"] == 16 and 0 <= metrics["position_bias_rate"] <= 1 and "all pairs" in capsys.readouterr().out


def run_feedback(cfg):
    """ai_feedback in this process with its handle (``cai.stages.handle``), exceptions as they are."""
    return feedback_run(cfg, handle(feedback_run, cfg))


def run_alignment(cfg):
    return alignment_run(cfg, handle(alignment_run, cfg))


def run_sl(run_dir) -> None:
    """sl_generate in this process on 4 red-team prompts (debug=tiny's), no revisions."""
    cfg = compose_cfg("sl_generate", [*TINY, f"run_dir={run_dir}", "n_revisions=0", "data.num_helpful=0"])
    sl_run(cfg, handle(sl_run, cfg))


def refused(cfg, kind=InputError, run=feedback_run) -> str:
    """The stage run in this process refuses ``cfg`` with ``kind`` (what ``run_stage`` turns into its one line and
    exit 1): the message, checked to be one line."""
    with pytest.raises(kind) as e:
        run(cfg, handle(run, cfg))
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)
