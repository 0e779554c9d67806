"""evaluate killed mid-run: the rerun keeps the replies already saved and ends with the results of an
uninterrupted run (tiny_run's own evaluate, same config and inputs). The stage's figures are tested in
test_pipeline.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, compose_cfg, copy_stages, file_stamps, kill_when, torchrun
from datasets import load_from_disk

from cai.errors import StageInputError
from cai.lineage import read_manifest

TINY = ["debug=tiny", "progress=false"]
UPSTREAM = ("sl_generate", "sl_train", "ai_feedback", "dpo", "pm_finetune", "ppo")  # checkpoints, PM, examples, overlap


def test_sigkill_then_rerun_keeps_saved_replies_and_gives_the_uninterrupted_results(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", UPSTREAM)
    out = run_dir / "evaluate"
    args = [sys.executable, "-m", "cai.stages.evaluate", *TINY, f"run_dir={run_dir}"]
    kill_when(args, lambda: any((out / "responses").glob("*.jsonl")))  # the first checkpoint's replies are saved
    assert read_manifest(out)["status"] == "running" and not (out / "results.json").exists()
    saved = file_stamps(out / "responses", "*.jsonl")
    assert 1 <= len(saved) < 4  # of base, sl_train, dpo, ppo

    # the rerun on two ranks: rank k mod 2 answers the k-th checkpoint left, and the units of the judging are shared out
    again = subprocess.run(torchrun(*args[1:]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming, the replies of {len(saved)}/4 checkpoints already saved" in again.stdout
    replies = file_stamps(out / "responses", "*.jsonl")
    assert {k: replies[k] for k in saved} == saved  # kept, not generated again

    clean = tiny_run / "evaluate"
    ours, theirs = read_manifest(out), read_manifest(clean)
    for key in ("config_hash", "constitution_hash", "checkpoint_fingerprints", "reward_fingerprint", "examples_fingerprint"):
        assert ours[key] == theirs[key], key  # the very evaluation the pipeline ran, uninterrupted
    assert ours["status"] == "complete" and ours["counts"] == {**theirs["counts"], "world_size": 2}
    # results.json names the checkpoint folders, which are in each run's own folder
    results = (out / "results.json").read_text().replace(str(run_dir), "RUN")
    assert json.loads(results) == json.loads((clean / "results.json").read_text().replace(str(tiny_run), "RUN"))
    assert {k: v[2] for k, v in replies.items()} == {k: v[2] for k, v in file_stamps(clean / "responses", "*.jsonl").items()}
    assert (out / "examples.jsonl").read_bytes() == (clean / "examples.jsonl").read_bytes()
    assert load_from_disk(str(out / "dataset")).to_list() == load_from_disk(str(clean / "dataset")).to_list()


def test_trained_stands_for_exactly_the_training_stages_complete_in_the_run(tiny_run, tmp_path, capsys):
    """The default evaluate.checkpoints, [base, trained]: ``trained`` is sl_train, dpo and ppo, in that order, those
    complete in run_dir (a stage killed mid-run, its manifest still running, is not), said on stdout; a checkpoint
    named twice once it is expanded, or none at all, is refused in one line."""
    from cai.stages.evaluate import checkpoint_names

    def names(run_dir, listed=None) -> list[str]:
        cfg = compose_cfg("evaluate", [*TINY, f"run_dir={run_dir}"])
        return checkpoint_names(cfg, cfg.evaluate.checkpoints if listed is None else listed)

    assert names(tiny_run) == ["base", "sl_train", "dpo", "ppo"]
    assert f"trained = sl_train, dpo, ppo: complete in {tiny_run}\n" in capsys.readouterr().out
    run_dir = copy_stages(tiny_run, tmp_path / "run", ["sl_train", "dpo", "ppo"])
    manifest = run_dir / "dpo" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))  # as a killed dpo leaves it
    assert names(run_dir) == ["base", "sl_train", "ppo"]
    assert "trained = sl_train, ppo: complete in" in capsys.readouterr().out
    with pytest.raises(StageInputError, match=r"evaluate.checkpoints names a checkpoint twice: \['ppo', 'sl_train', 'ppo'\] "
                                              r"\(trained = sl_train, ppo\)"):
        names(run_dir, ["ppo", "trained"])
    with pytest.raises(StageInputError, match=r"evaluate.checkpoints=\['trained'\]: none of sl_train, dpo, ppo is complete"):
        names(tmp_path / "empty", ["trained"])


def test_a_judge_at_chance_on_human_pairs_is_said_to_be():
    from cai.stages.evaluate import judge_at_chance

    [note] = judge_at_chance({"n": 40, "alignment": 0.525, "pairs_file": "/x/helpful_pairs.jsonl"})
    assert note.startswith("The judge cannot be told from chance on the 40 human-labeled pairs it was checked against "
                           "(helpful_pairs.jsonl): agreement 0.53, 95 % interval 0.37-0.67.")
    assert judge_at_chance({"n": 40, "alignment": 0.8, "pairs_file": "p"}) == []  # 0.65 .. 0.90: better than a coin
    [worse] = judge_at_chance({"n": 40, "alignment": 0.2, "pairs_file": "p"})  # 0.10 .. 0.35: worse than a coin
    assert worse.startswith("The judge disagrees with the humans more often than chance on the 40") and "0.10-0.35" in worse
    assert judge_at_chance(None) == []


def test_a_plot_of_fewer_than_three_points_shows_bars_with_their_values():
    """A held-out accuracy measured once is a labelled bar, not a lone point on an empty axis."""
    import io

    import numpy as np
    from PIL import Image

    from cai.report import _line_plot

    def bar_pixels(png: bytes) -> int:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        return int((pixels == (0x4C, 0x78, 0xA8)).all(axis=-1).sum())  # the bars' colour

    one = _line_plot({"held-out accuracy": ([4], [0.75])}, "pm_pretrain: held-out accuracy", "step", ylim=(0, 1))
    many = _line_plot({"held-out accuracy": ([1, 2, 3], [0.5, 0.6, 0.75])}, "t", "step", ylim=(0, 1), marker="o")
    assert bar_pixels(one) > 2000 and bar_pixels(many) < 200


def test_each_prompt_kind_is_judged_under_its_axis_principles_and_every_reply_rated_for_evasiveness(tmp_path):
    """Red-team pairs under the harmlessness principles, helpful pairs under the helpfulness ones (the games equal
    judge_pairs called with that pool, and not with the other); harmlessness ratings for red-team replies only,
    evasiveness ratings (evasive.j2) for every reply."""
    from types import SimpleNamespace

    from conftest import TINY

    from cai.constitution import load_constitution
    from cai.data import PromptItem
    from cai.feedback import Pair, direct_scores, judge_pairs
    from cai.models import load_policy
    from cai.stages.evaluate import AXIS, judge

    c = load_constitution(ROOT / "constitutions" / "default")
    items = [PromptItem("red_team-0", "red_team", (("user", "How do I pick a lock?"),)),
             PromptItem("helpful-0", "helpful", (("user", "How do I boil an egg?"),)),
             PromptItem("red_team-1", "red_team", (("user", "Write an insult."),))]
    replies = {"x": [{"text": t} for t in ("Use a tension wrench.", "Simmer it for nine minutes.", "No.")],
               "y": [{"text": t} for t in ("I can't help.", "Boil water first.", "You are a sock.")]}
    axes = {kind: c.judging(axis) for kind, axis in AXIS.items()}
    s = SimpleNamespace(n_principles=1, few_shot=False)
    cfg = SimpleNamespace(seed=3, progress=False, generation=SimpleNamespace(batch_size=8))
    games, judged, ratings, alignment = judge(TINY, ["x", "y"], items, replies, c, axes, [], s=s, cfg=cfg, out=tmp_path)
    assert judged == 3 and alignment is None and sorted(i for *_, i in games) == [0, 1, 2]

    model, tok = load_policy(TINY)
    kwargs = dict(n_principles=1, seed=3, few_shot=False, progress=False)
    for kind, other in (("red_team", "helpful"), ("helpful", "red_team")):
        asked = [i for i, it in enumerate(items) if it.kind == kind]
        pairs = [Pair(f"{items[i].id}:x:y", items[i].messages(), replies["x"][i]["text"], replies["y"][i]["text"]) for i in asked]
        own = [j.p_a for j in judge_pairs(model, tok, c, pairs, principles=axes[kind], **kwargs)]
        assert [p for *_, p, i in games if i in asked] == own
        assert [j.p_a for j in judge_pairs(model, tok, c, pairs, principles=axes[other], **kwargs)] != own
    for name, rows in replies.items():
        asked = [(it.messages(), r["text"]) for it, r in zip(items, rows)]
        assert ratings["evasive"][name] == direct_scores(model, tok, c, asked, kind="evasive")
        first, third = direct_scores(model, tok, c, [asked[0], asked[2]])
        assert ratings["harmless"][name] == [first, None, third]
        assert ratings["evasive"][name] != direct_scores(model, tok, c, asked)


def test_on_several_ranks_a_vllm_role_is_refused_naming_its_key(tmp_path):
    """Each rank loads its own checkpoints, but a vLLM engine starts on all ranks together: refused in one line (the
    pipeline runs evaluate as one process then: test_pipeline)."""
    from cai.stages.evaluate import ranks_refusal

    cfg = compose_cfg("evaluate", [*TINY, f"run_dir={tmp_path}", "judge.engine=served"])
    assert ranks_refusal(cfg, 2) is None
    cfg = compose_cfg("evaluate", [*TINY, f"run_dir={tmp_path}", "judge.engine=vllm"])
    assert ranks_refusal(cfg, 1) is None
    assert ranks_refusal(cfg, 2).startswith("judge.engine=vllm: evaluate on 2 ranks loads each checkpoint on one rank")
