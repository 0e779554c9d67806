"""The whole pipeline: every stage on tiny models, the summary, skipping what is up to date, rerunning what
changed and its downstream, sweeps that share upstream stages, evaluate's results and the run report."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, command_refuses, compose_cfg, copy_stages, outputs, run_module, sweep_jobs

from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.pipeline import STAGES, launch_command, stage_keys, up_to_date
from cai.stage_folder import config_hash
from cai.stages.evaluate import judge_at_chance

TINY_ARGS = ["debug=tiny", "progress=false"]


def _statuses(run_dir) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in json.loads((run_dir / "pipeline.json").read_text())["stages"]}


def test_sweep_runs_every_stage_per_job_and_shares_upstream_stages(tiny_sweep):
    jobs = sweep_jobs(tiny_sweep)
    assert len(jobs) == 4
    out = (tiny_sweep.parent / "pipeline.out").read_text()
    for stage in STAGES:
        assert f"=== cai.pipeline: {stage} ===" in out
    first, *others = (_statuses(job) for job in jobs)
    assert set(first.values()) == {"ran"}, first
    # the other jobs differ only in ppo.algorithm: everything upstream of ppo is the first job's folder
    for other, job in zip(others, jobs[1:]):
        assert first.keys() == other.keys() == set(STAGES)
        for stage in ("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune"):
            assert other[stage] == "skipped", (stage, other)  # no process started: the first job recorded it
            assert (jobs[0] / stage).resolve() == (job / stage).resolve()
        for stage in ("ppo", "evaluate"):
            assert other[stage] == "ran"
            assert (jobs[0] / stage).resolve() != (job / stage).resolve()
    # the critic-free methods ran end to end in the pipeline: 4 responses per prompt, no value model; RLAIF's
    # REINFORCE with one response per prompt and a value model as its baseline
    manifests = [read_manifest(job / "ppo") for job in jobs]
    assert [m["algorithm"] for m in manifests] == ["ppo", "rloo", "grpo", "reinforce"]
    assert [m["counts"]["samples_per_prompt"] for m in manifests] == [1, 4, 4, 1]
    assert ["value" in m["devices"] for m in manifests] == [True, False, False, True]
    assert all("group_score_std" in row for job in jobs[1:3] for row in read_metrics(job / "ppo"))
    assert all("value_loss" in row and "group_score_std" not in row for row in read_metrics(jobs[3] / "ppo"))
    assert "<h2>RL-CAI (GRPO)</h2>" in (jobs[2] / "report.html").read_text()
    assert "<h2>RL-CAI (REINFORCE)</h2>" in (jobs[3] / "report.html").read_text()
    for job in jobs:
        assert (job / "report.html").exists() and (job / "ppo" / "model" / "model.safetensors").exists()


def test_a_sweep_over_the_labeler_shares_every_stage_that_does_not_read_it(tiny_sweep, tmp_path):
    """A sweep over a model role on a copy of the session sweep's shared stage folders: labeler seed 1 is the labeler
    debug=tiny already used (every stage up to date, nothing started); seed 3 reruns ai_feedback and everything
    after it, and shares sl_generate, sl_train and pm_pretrain, which do not read the labeler."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep / "shared", sweep / "shared", symlinks=True)
    result = run_module("cai.pipeline", "-m", *TINY_ARGS, "ppo.kl_coef=0.05", "labeler.tiny.seed=1,3", f"run_dir={sweep}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    same, other = sweep_jobs(sweep)
    assert set(_statuses(same).values()) == {"skipped"}, _statuses(same)
    reads_labeler = ("ai_feedback", "dpo", "pm_finetune", "ppo", "evaluate")  # ai_feedback and its downstream
    assert _statuses(other) == {s: "ran" if s in reads_labeler else "skipped" for s in STAGES}, _statuses(other)
    for stage in STAGES:
        assert ((same / stage).resolve() == (other / stage).resolve()) is (stage not in reads_labeler), stage
    seeds = [read_manifest(job / "ai_feedback")["roles"]["labeler"]["model"] for job in (same, other)]
    assert seeds == ["tiny-random (seed 1, vocab 384)", "tiny-random (seed 3, vocab 384)"]


def test_stage_keys_follow_the_roles_each_stage_reads():
    keys = stage_keys(compose_cfg("pipeline", TINY_ARGS), "c")

    def changed(*overrides: str) -> set[str]:
        other = stage_keys(compose_cfg("pipeline", [*TINY_ARGS, *overrides]), "c")
        return {s for s in STAGES if other[s]["key"] != keys[s]["key"]}

    assert changed("judge.tiny.seed=5") == {"evaluate"}
    assert changed("sl_start.path=/models/pretrained") == set(STAGES) - {"sl_generate"}  # the PM backbone follows it
    assert changed("pm_backbone.dtype=bfloat16") == {"pm_pretrain", "pm_finetune", "ppo", "evaluate"}
    assert changed("reviser.path=/models/helpful") == set(STAGES) - {"pm_pretrain"}
    assert changed("policy.path=tiny-random") == set()  # naming the model a role falls back to changes nothing


def test_summary_table_names_every_stage_with_its_key_figures(tiny_sweep):
    out = (tiny_sweep.parent / "pipeline.out").read_text()
    table = out[out.rindex("stage         status"):]
    for stage in STAGES:
        assert f"\n{stage} " in table
    assert "rows" in table and "steps" in table and "held-out accuracy" in table and "Elo base" in table
    assert "cai.pipeline: report -> " in table


def test_evaluate_compares_every_checkpoint_in_both_directions(tiny_run):
    results = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    names = ["base", "sl_train", "dpo", "ppo"]  # the default [base, trained]: every training stage the pipeline ran
    assert list(results["checkpoints"]) == names
    for entry in results["checkpoints"].values():
        assert {"elo", "pm_score", "harmless_rate", "judge_rating", "judge_rating_sd", "response_tokens", "eos_rate"} <= set(entry)
        assert 0 <= entry["harmless_rate"] <= 1 and -1 <= entry["judge_rating"] <= 1 and 0 <= entry["judge_rating_sd"] <= 1
        # CAI's two axes, and the evasiveness rate over every reply and per prompt kind
        assert {"elo_harmless", "elo_helpful", "evasive_rate", "evasive_rate_red_team", "evasive_rate_helpful"} <= set(entry)
        assert all(0 <= entry[k] <= 1 for k in ("evasive_rate", "evasive_rate_red_team", "evasive_rate_helpful"))
    for axis in ("elo", "elo_harmless", "elo_helpful"):
        assert sum(c[axis] for c in results["checkpoints"].values()) / len(names) == pytest.approx(1000, abs=0.5)
    # the figures as metrics rows too (what TensorBoard and W&B mirror): one per checkpoint, in order
    rows = read_metrics(tiny_run / "evaluate")
    assert [(r["step"], r["checkpoint"]) for r in rows] == list(enumerate(names))
    assert [r["elo"] for r in rows] == [results["checkpoints"][n]["elo"] for n in names] and "win_rate_vs_base" in rows[2]
    for a in names:
        for b in names:
            if a != b:
                assert results["win_rate"][a][b] + results["win_rate"][b][a] == pytest.approx(1, abs=1e-3)
                assert 0 < results["lc_win_rate"][a][b] < 1
    assert results["games"] == 6 * (results["prompts"]["red_team"] + results["prompts"]["helpful"])  # 4 choose 2 pairs
    manifest = read_manifest(tiny_run / "evaluate")
    assert manifest["status"] == "complete" and manifest["counts"]["held_out_overlap"] == 0
    # debug=tiny's judge is not the labeler; the PM score is read with ppo's own reward model, and says so; the judge
    # was checked against cai's built-in human pairs (evaluate.pairs=builtin), and a note says whether it is at chance
    assert results["judge"] == "tiny-random (seed 2, vocab 448)" and results["alignment"]["n"] == 20  # demo: 20 of 40
    assert results["notes"][0].startswith("The PM score is read with the PM that PPO optimised as its reward")
    assert results["notes"][1:] == judge_at_chance(results["alignment"])
    from datasets import load_from_disk

    rows = load_from_disk(str(tiny_run / "evaluate" / "dataset"))
    assert len(rows) == len(names) * manifest["counts"]["prompts"] and set(rows["checkpoint"]) == set(names)
    examples = [json.loads(line) for line in (tiny_run / "evaluate" / "examples.jsonl").read_text().splitlines()]
    sl_rows = load_from_disk(str(tiny_run / "sl_generate" / "dataset"))
    assert examples and all(set(ex["replies"]) == set(names) for ex in examples)
    first = [r for r in sl_rows if r["kind"] == "red_team"][0]
    assert examples[0]["critiques"] == first["critiques"] and examples[0]["principle_ids"] == first["principle_ids"]


def test_report_shows_every_stage_with_plots_and_examples(tiny_run):
    page = (tiny_run / "report.html").read_text()
    for section in ("<h2>Stages</h2>", "<h2>SL-CAI</h2>", "<h2>AI feedback</h2>", "<h2>DPO</h2>", "<h2>Preference model</h2>",
                    "<h2>RL-CAI (PPO)</h2>", "<h2>Evaluation</h2>", "Examples: from red-team prompt to RL answer"):
        assert section in page, section
    assert "has not run" not in page and "not run" not in page
    # SL loss, labels, DPO x4, PM curves + reliability, PPO x4, Elo, frontier
    assert page.count('src="data:image/png;base64,') >= 15
    # DPO: its loss and pairs from the manifest, a held-out row per epoch; every checkpoint under its label
    dpo = read_manifest(tiny_run / "dpo")
    assert f"Loss: {dpo['loss']} (" in page and f"Pairs: {dpo['pairs_source']} &middot;" in page
    held_out = page[page.index("Held-out pairs, after each epoch"):page.index("<h2>Preference model</h2>")]
    assert held_out.count("<tr>") == 1 + sum(r.get("split") == "eval" for r in read_metrics(tiny_run / "dpo"))
    assert "<th>row beats column</th><th>base</th><th>SL-CAI</th><th>DPO</th><th>RL-CAI</th>" in page
    assert "harmlessness Elo" in page and "helpfulness Elo" in page and "Length-controlled (RLAIF)" in page
    # the model behind each role, in the stage table; the circular PM score, next to the evaluation's figures
    assert "labeler: tiny-random (seed 1, vocab 384)" in page and "policy: sl_train/model" in page
    assert "judge: tiny-random (seed 2, vocab 448)" in page and "Read with care:</b> The PM score is read with" in page
    assert "critique 1 (principle " in page and "DPO answers" in page and "RL-CAI answers" in page
    assert "<script" not in page


def test_report_cli_and_comparison_of_sweep_jobs(tiny_sweep, tmp_path, capsys):
    """``cai report`` (cai.cli.main, the console command's function, called in this process)."""
    from cai.cli import main as cai

    jobs = sweep_jobs(tiny_sweep)
    assert cai(["report", "--compare", *map(str, jobs)]) == 0, capsys.readouterr().err
    page = (tiny_sweep / "compare.html").read_text()  # above jobs/, so a later jobs/* glob does not pick it up
    for job in jobs:
        assert f"<td>{job.name}</td>" in page
    # one column per key the sweep varied (and none for the keys every job shares)
    assert "<th>ppo.algorithm</th>" in page and all(f"<td>{name}</td>" in page for name in ("ppo", "rloo", "grpo", "reinforce"))
    assert "<th>debug</th>" not in page and "<h2>RL</h2>" in page
    copy = copy_stages(jobs[0], tmp_path / "copy", ["sl_generate", "sl_train"])
    assert cai(["report", str(copy)]) == 0 and (copy / "report.html").exists()
    assert "ppo has not run" in (copy / "report.html").read_text() and "dpo has not run." in (copy / "report.html").read_text()
    capsys.readouterr()
    assert cai(["report", str(tmp_path / "missing")]) == 1 and "no such run directory" in capsys.readouterr().err


def test_rerun_skips_everything_and_a_changed_kl_coef_reruns_only_ppo_and_evaluate(tiny_run, tmp_path):
    run_dir = copy_stages(tiny_run, tmp_path / "run", STAGES)  # copies keep their files' times
    record = json.loads((tiny_run / "pipeline.json").read_text())
    del record["seen"]["sl_generate"]  # as if the pipeline had not seen it finish: it must check itself
    (run_dir / "pipeline.json").write_text(json.dumps(record))
    args = [*TINY_ARGS, "ppo.kl_coef=0.05", f"run_dir={run_dir}"]
    first = run_module("cai.pipeline", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert _statuses(run_dir) == {**{s: "skipped" for s in STAGES}, "sl_generate": "up to date"}, _statuses(run_dir)
    before = outputs(run_dir)
    again = run_module("cai.pipeline", *args)
    assert again.returncode == 0 and set(_statuses(run_dir).values()) == {"skipped"}, _statuses(run_dir)
    assert "=== cai.pipeline:" not in again.stdout  # no stage process was started
    after = outputs(run_dir)
    assert {k: v for k, v in after.items() if k != "pipeline.json" and k != "report.html"} == \
        {k: v for k, v in before.items() if k != "pipeline.json" and k != "report.html"}
    changed = run_module("cai.pipeline", *TINY_ARGS, "ppo.kl_coef=0.02", f"run_dir={run_dir}")
    assert changed.returncode == 0, changed.stderr[-2000:]
    statuses = _statuses(run_dir)
    assert statuses == {**{s: "skipped" for s in STAGES}, "ppo": "ran", "evaluate": "ran"}, statuses
    assert read_manifest(run_dir / "ppo")["config"]["ppo"]["kl_coef"] == 0.02


def test_stage_keys_follow_the_config_and_the_constitution_downstream():
    base = compose_cfg("pipeline", TINY_ARGS)
    keys = stage_keys(base, "constitution-a")
    kl = stage_keys(compose_cfg("pipeline", [*TINY_ARGS, "ppo.kl_coef=0.5"]), "constitution-a")
    changed = {s for s in STAGES if keys[s]["key"] != kl[s]["key"]}
    assert changed == {"ppo", "evaluate"}
    edited = stage_keys(base, "constitution-b")
    # pm_pretrain reads no constitution; everything else reads it or is downstream of a stage that does
    assert {s for s in STAGES if keys[s]["key"] != edited[s]["key"]} == set(STAGES) - {"pm_pretrain"}
    assert keys["pm_pretrain"]["constitution_hash"] is None


def test_up_to_date_needs_a_complete_manifest_with_the_same_hashes(tmp_path):
    plan = {"config_hash": "c1", "constitution_hash": "k1"}
    folder = tmp_path / "ppo"
    folder.mkdir()
    assert not up_to_date(folder, "ppo", plan, {}, {})  # no manifest
    for manifest, expected in [({"status": "complete", "config_hash": "c1", "constitution_hash": "k1"}, True),
                               ({"status": "running", "config_hash": "c1", "constitution_hash": "k1"}, False),
                               ({"status": "complete", "config_hash": "c2", "constitution_hash": "k1"}, False),
                               ({"status": "complete", "config_hash": "c1", "constitution_hash": "k2"}, False)]:
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert up_to_date(folder, "ppo", plan, {"upstream": {"sl_train": 1}}, {"upstream": {"sl_train": 1}}) is expected, manifest
    # what the pipeline saw last time (upstream manifests, launcher) must match too
    assert not up_to_date(folder, "ppo", plan, {"upstream": {"sl_train": 2}}, {"upstream": {"sl_train": 1}})
    assert not up_to_date(folder, "ppo", plan, {"upstream": {}}, None)


def test_an_input_file_edited_in_place_changes_the_config_hash(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    cfg = compose_cfg("sl_generate", [*TINY_ARGS, f"data.red_team_path={prompts}"])
    before = config_hash(cfg, ("data",))
    assert config_hash(cfg, ("data",)) == before
    prompts.write_text('{"prompt": "Hello there"}\n')
    assert config_hash(cfg, ("data",)) != before
    assert config_hash(cfg, ("model",)) == config_hash(cfg, ("model",))  # model.path=tiny-random names no file


def test_bad_pipeline_input_is_one_line_and_writes_nothing(tmp_path):
    """The pipeline's command run in this process (``command_refuses``): its one-line SystemExit, before any stage."""
    assert "stages= names unknown stage(s) ['rlhf']" in command_refuses(
        "cai.pipeline", *TINY_ARGS, f"run_dir={tmp_path / 'r'}", "stages=[sl_generate,rlhf]")
    assert "launcher.name must be python or deepspeed" in command_refuses(
        "cai.pipeline", *TINY_ARGS, f"run_dir={tmp_path / 'r'}", "launcher.name=slurm")
    assert not (tmp_path / "r" / "pipeline.json").exists()


def test_evaluate_refuses_bad_checkpoints_and_keeps_earlier_outputs(tiny_run, tmp_path):
    """evaluate in this process, as run_stage runs it: each setting refused with an InputError in one line (run_stage's
    exit 1, tests/test_bad_inputs.py) before anything is written."""
    from cai.errors import InputError
    from cai.stages import handle
    from cai.stages.evaluate import run

    run_dir = copy_stages(tiny_run, tmp_path / "run", ["sl_generate", "sl_train", "evaluate"])
    before = outputs(run_dir)
    for override, text in [("evaluate.checkpoints=[]", "evaluate.checkpoints is empty"),
                           ("evaluate.checkpoints=[base,base]", "names a checkpoint twice"),
                           ("evaluate.checkpoints=[base,ppo]", "holds no complete ppo run"),
                           (f"evaluate.checkpoints=[{tmp_path / 'nowhere'}]",
                            "is not base, trained, sl_train, dpo, ppo, round-<r>/dpo, round-<r>/ppo or a checkpoint folder"),
                           ("evaluate.num_examples=-1", "evaluate.num_examples must be >= 0")]:
        cfg = compose_cfg("evaluate", [*TINY_ARGS, f"run_dir={run_dir}", override])
        with pytest.raises(InputError) as refused:
            run(cfg, handle(run, cfg))
        assert text in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert outputs(run_dir) == before


def test_evaluate_with_two_checkpoints_and_human_pairs(tiny_run, tmp_path, capsys):
    """Also: a judge that is the training labeler (debug=tiny's labeler: seed 1, vocabulary 384) is said to be. evaluate
    runs in this process (its handle on its folder, as run_stage runs it)."""
    from cai.stages import handle
    from cai.stages.evaluate import run

    run_dir = copy_stages(tiny_run, tmp_path / "run", ["sl_generate", "sl_train", "ai_feedback", "pm_finetune"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: A helpful answer {i}.",
                                         "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."}) + "\n" for i in range(3)))
    cfg = compose_cfg("evaluate", [*TINY_ARGS, f"run_dir={run_dir}", f"evaluate.pairs={pairs}", "evaluate.num_examples=0",
                                   "judge.tiny={seed:1,vocab_size:384}"])
    run(cfg, handle(run, cfg))
    stdout = capsys.readouterr().out
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    # the default [base, trained], with neither dpo nor ppo in the run
    assert "trained = sl_train: complete in" in stdout and "(dpo, ppo: not complete there)" in stdout
    assert list(results["checkpoints"]) == ["base", "sl_train"] and results["alignment"]["n"] == 3
    assert "judge vs human labels" in stdout
    # no ppo checkpoint: the PM score is not circular; the judge is; and 3 pairs cannot tell any judge from chance
    assert results["notes"][0].startswith("The judge is the model that labeled ai_feedback's") and len(results["notes"]) == 2
    assert results["notes"][1].startswith("The judge cannot be told from chance on the 3 human-labeled pairs")
    assert "note: The judge is the model that labeled" in stdout
    assert read_manifest(run_dir / "evaluate")["roles"]["judge"] == read_manifest(run_dir / "ai_feedback")["roles"]["labeler"]
    assert not (run_dir / "evaluate" / "examples.jsonl").read_text()


def test_report_renders_in_a_headless_browser(tiny_run, tmp_path):
    """What a person sees: Chromium renders the page offline, and its plots are real images, not blanks."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot_report import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    pages = screenshot(tiny_run / "report.html", tmp_path, page_height=1600)
    assert len(pages) >= 3  # stages, curves, evaluation and examples take several screens
    from PIL import Image

    colours = {len(Image.open(p).convert("RGB").getcolors(1 << 20) or []) for p in pages}
    assert min(colours) > 50, colours  # text, tables and anti-aliased plot lines, not an empty page


def test_under_deepspeed_a_generating_stage_whose_roles_cannot_run_per_rank_runs_as_one_process():
    """evaluate with a vLLM judge, or sl_generate with a vLLM policy split over a number of GPUs that does not divide the
    ranks' or with two vLLM models, cannot run an engine per rank (or group of ranks): the pipeline runs such a stage as
    one process (as before generation ran on every rank) and says why; on one rank, or with hf roles, nothing changes."""
    from cai.pipeline import one_process_stages

    def which(*overrides: str) -> dict[str, str]:
        return one_process_stages(compose_cfg("pipeline", [*TINY_ARGS, *overrides]), STAGES)

    assert which("launcher=deepspeed", "launcher.num_gpus=2") == {}
    assert which("judge.engine=vllm") == {}  # one process anyway
    assert list(which("launcher=deepspeed", "launcher.num_gpus=2", "judge.engine=vllm")) == ["evaluate"]
    split = ("launcher=deepspeed", "policy.engine=vllm", "policy.vllm.tensor_parallel_size=2")
    assert list(which(*split, "launcher.num_gpus=4")) == ["evaluate"]  # two groups of two ranks, each one engine
    why = which(*split, "launcher.num_gpus=3")
    assert list(why) == ["sl_generate", "ai_feedback", "evaluate"]
    assert why["sl_generate"] == ("policy.vllm.tensor_parallel_size=2 on 3 ranks: the model is split over groups of 2 "
                                  "ranks, so the number of ranks must be a multiple of 2")
    why = which("launcher=deepspeed", "launcher.num_gpus=2", "policy.engine=vllm", "labeler.engine=vllm", "labeler.tiny.seed=7")
    assert why["ai_feedback"].startswith("policy.engine=vllm and labeler.engine=vllm on 2 ranks: each rank's process runs one")
    assert "sl_generate" not in why  # policy and reviser: one model
    launcher = {"name": "deepspeed", "num_gpus": 2, "num_nodes": 1}
    assert launch_command("evaluate", [], launcher, one_process=True)[1:3] == ["-m", "cai.stages.evaluate"]


def test_launcher_deepspeed_runs_training_stages_on_two_ranks(tiny_run, tmp_path):
    """sl_train runs on two ranks; sl_generate, which the sweep ran as one process, is skipped: the number of ranks is
    no part of a sharded stage's rows (its two-rank runs: test_sl_generate, test_ai_feedback, test_evaluate)."""
    run_dir = copy_stages(tiny_run, tmp_path / "run", ["sl_generate"])  # copies keep their files' times
    seen = json.loads((tiny_run / "pipeline.json").read_text())["seen"]  # so the pipeline skips it, starting nothing
    (run_dir / "pipeline.json").write_text(json.dumps({"seen": {"sl_generate": seen["sl_generate"]}}))
    result = run_module("cai.pipeline", *TINY_ARGS, f"run_dir={run_dir}", "stages=[sl_generate,sl_train]",
                        "launcher=deepspeed", "launcher.num_gpus=2", "deepspeed=zero3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--no_local_rank --num_gpus 2 --num_nodes 1 --module cai.stages.sl_train" in " ".join(
        launch_command("sl_train", [], {"name": "deepspeed", "num_gpus": 2, "num_nodes": 1, "hostfile": None}))
    sharded = launch_command("sl_generate", [], {"name": "deepspeed", "num_gpus": 2, "num_nodes": 1})
    assert sharded[-2:] == ["--module", "cai.stages.sl_generate"]
    manifest = read_manifest(run_dir / "sl_train")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert _statuses(run_dir) == {"sl_generate": "skipped", "sl_train": "ran"}
