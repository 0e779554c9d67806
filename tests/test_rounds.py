"""The pipeline's iterated rounds (``rounds=R``): each later round labels fresh pairs sampled by the previous round's
policy and trains that policy again on them, in its own folders, with the lineage in its manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_stages, run_command, run_module
from datasets import load_from_disk

from cai.lineage import input_fingerprint, read_manifest
from cai.pipeline import round_links, schedule


def test_a_second_round_samples_from_the_first_rounds_policy_and_trains_it_again(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train", "ai_feedback", "dpo"))
    args = ["debug=tiny", "progress=false", f"run_dir={run_dir}", "stages=[dpo,evaluate]", "rounds=2",
            "evaluate.checkpoints=[trained]", "evaluate.num_prompts=2", "evaluate.num_helpful=0", "evaluate.pairs=null",
            "evaluate.num_examples=0"]
    result = run_module("cai.pipeline", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    second = run_dir / "round-2"
    # round 2 starts from round 1's policy: ai_feedback sampled with it, dpo trained it, on round 2's own pairs
    feedback, dpo = read_manifest(second / "ai_feedback"), read_manifest(second / "dpo")
    assert feedback["status"] == dpo["status"] == "complete" and feedback["config"]["ai_feedback"]["round"] == 2
    assert feedback["policy_fingerprint"] == dpo["start_fingerprint"] == input_fingerprint(run_dir / "dpo")
    assert dpo["pairs_fingerprint"] == input_fingerprint(second / "ai_feedback")
    # fresh prompts: the next block of the same order
    first_ids = set(load_from_disk(str(run_dir / "ai_feedback" / "dataset"))["id"])
    second_ids = set(load_from_disk(str(second / "ai_feedback" / "dataset"))["id"])
    assert second_ids and not first_ids & second_ids
    # evaluate compares every round's policy; the report puts the rounds side by side
    results = read_manifest(run_dir / "evaluate")
    assert results["summary"]["elo"].keys() == {"sl_train", "dpo", "round-2/dpo"}
    page = (run_dir / "report.html").read_text()
    assert "<h2>Rounds</h2>" in page and "DPO, round 2" in page
    # a rerun starts nothing: round 2's stages are skipped like round 1's
    again = run_module("cai.pipeline", *args)
    assert again.returncode == 0 and "=== cai.pipeline" not in again.stdout
    assert [line.split()[:2] for line in again.stdout.splitlines() if line.startswith(("dpo", "round-2/", "evaluate"))] == [
        ["dpo", "skipped"], ["round-2/ai_feedback", "skipped"], ["round-2/dpo", "skipped"], ["evaluate", "skipped"]]


def test_later_rounds_run_after_round_one_and_before_evaluate():
    stages = ["sl_generate", "sl_train", "ai_feedback", "dpo", "evaluate"]
    assert schedule(stages, 1, ["ai_feedback", "dpo"]) == [(1, s) for s in stages]
    assert schedule(stages, 3, ["ai_feedback", "dpo"]) == [(1, "sl_generate"), (1, "sl_train"), (1, "ai_feedback"),
                                                          (1, "dpo"), (2, "ai_feedback"), (2, "dpo"), (3, "ai_feedback"),
                                                          (3, "dpo"), (1, "evaluate")]


def test_a_round_reads_the_policy_and_pm_of_the_round_before():
    run = Path("/r")
    assert round_links(run, 2, ["ai_feedback", "dpo"], "dpo") == {"sl_train": run / "dpo", "sl_generate": run / "sl_generate"}
    assert round_links(run, 3, ["ai_feedback", "pm_finetune", "ppo"], "ppo") == {
        "sl_train": run / "round-2" / "ppo", "sl_generate": run / "sl_generate", "pm_pretrain": run / "round-2" / "pm_finetune"}


@pytest.mark.parametrize("override, message", [
    ("rounds=0", "rounds must be an integer >= 1, got 0"),
    ("round_stages=[dpo,ai_feedback]", "round_stages=['dpo', 'ai_feedback']: a round labels fresh pairs and trains the "
                                       "policy on them: [ai_feedback, dpo] or [ai_feedback, pm_finetune, ppo]"),
    ("round_stages=[ai_feedback,ppo]", "a round labels fresh pairs and trains the policy on them"),
    ("stages=[sl_generate,sl_train,ai_feedback,evaluate]", "rounds=2 trains each round's policy with dpo, which stages= "
                                                            "does not run in round 1"),
])
def test_bad_rounds_are_refused_before_any_stage(tmp_path, override, message):
    code = run_command("cai.pipeline", "debug=tiny", f"run_dir={tmp_path}", "rounds=2", override)
    assert message in str(code) and [f.name for f in tmp_path.iterdir()] == ["pipeline"]  # Hydra's log: no stage ran
