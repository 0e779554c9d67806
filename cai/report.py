"""The run report: one self-contained HTML page per run directory, and a side-by-side page for sweeps.

    cai report RUN_DIR                       # -> RUN_DIR/report.html
    cai report --compare DIR DIR ... [-o F]  # -> F (default: compare.html beside the runs, or above their jobs/ folder)

Everything comes from what the stages wrote (manifests, ``metrics.jsonl``, datasets, ``results.json``,
``examples.jsonl``); nothing is recomputed and no model is loaded. Plots are PNGs made with matplotlib
and inlined as data URIs, so the page opens offline and can be mailed as one file. Text written by
models is HTML-escaped. Stages that did not run are listed as such, never faked.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

from cai.files import atomic_write_text
from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.stage_folder import round_folders
from cai.stages import STAGES

PPO_CURVES = (("score", "mean score"), ("reward", "reward (score with its KL term)"), ("kl", "KL to reference (nats/seq)"),
              ("response_length", "response length (tokens)"), ("response_chars", "response length (characters)"),
              ("group_score_std", "score spread within a prompt's group"),
              ("label_decisiveness", "labeler decisiveness, mean |p - 1/2|"), ("margin", "DPO margin, beta * h"))
ALGORITHM_NAMES = {"ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "reinforce": "REINFORCE",
                   "online_dpo": "online DPO"}
DPO_LOSSES = {"sigmoid": "sigmoid (DPO, Rafailov et al. 2023)", "ipo": "ipo (IPO, Azar et al. 2023)",
              "soft": "soft (the cross-entropy against each pair's P(chosen better): cDPO, smoothed 1 - p per pair)"}
# evaluate's checkpoint names as the report shows them (a checkpoint folder keeps its path); PARENT: what each was
# trained from when that stage ran (the Elo plane joins each point to its parent's)
CHECKPOINT_LABELS = {"base": "base", "sl_train": "SL-CAI", "dpo": "DPO", "ppo": "RL-CAI"}
PARENT = {"sl_train": "base", "dpo": "sl_train", "ppo": "sl_train"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#1d2733;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #d9e2ec;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d9e2ec;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#6b7c93} .warn{background:#fff8e1;border-left:4px solid #f0b429;padding:.4em .8em}
.plots img{max-width:48%;margin:.3em;border:1px solid #e4e9ef}
.example{border:1px solid #d9e2ec;border-radius:6px;padding:.6em 1em;margin:1em 0;background:#fbfcfd}
.example .step{margin:.4em 0} .example .label{font-weight:600;color:#334e68;display:block;font-size:.85em}
.example pre{white-space:pre-wrap;margin:.1em 0;font-family:inherit;background:#fff;border-left:3px solid #9fb3c8;padding:.2em .6em}
.replies{display:flex;gap:.6em} .replies>div{flex:1;min-width:0}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    manifests = {s: read_manifest(run_dir / s) for s in STAGES}
    parts = [f"<h1>cai run report</h1><p class=muted>{_e(str(run_dir.resolve()))} &middot; written "
             f"{time.strftime('%Y-%m-%d %H:%M')}</p>", _stage_table(run_dir, manifests)]
    parts.append(_section_sl(run_dir, manifests))
    parts.append(_section_feedback(run_dir, manifests))
    parts.append(_section_dpo(run_dir, manifests))
    parts.append(_section_pm(run_dir, manifests))
    parts.append(_section_ppo(run_dir, manifests))
    parts.append(_section_rounds(run_dir))
    parts.append(_section_evaluate(run_dir, manifests))
    parts.append(_section_examples(run_dir, manifests))
    path = run_dir / "report.html"
    atomic_write_text(path, _page("cai run report", "".join(parts)))
    return path


def write_comparison(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write one page that puts several runs (e.g. the jobs of a sweep) side by side."""
    dirs = [Path(d) for d in run_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"no such run directory: {', '.join(missing)}")
    if out is None:  # a sweep's jobs sit in R/jobs/: the page goes to R, where a jobs/* glob does not pick it up
        parent = dirs[0].resolve().parent
        out = (parent.parent if parent.name == "jobs" else parent) / "compare.html"
    out = Path(out)
    overrides = {d: _overrides((_read_json(d / "pipeline.json") or {}).get("overrides", [])) for d in dirs}
    # the keys the runs were told differently: one column each (a key some run left at its default shows "-")
    varied = sorted({k for o in overrides.values() for k in o if len({o2.get(k) for o2 in overrides.values()}) > 1})
    rows = []
    for d in dirs:
        m = {s: read_manifest(d / s) or {} for s in STAGES}
        results = _read_json(d / "evaluate" / "results.json") or {}
        ppo = m["ppo"].get("summary", {})
        pmf = m["pm_finetune"].get("eval") or {}
        elo = ", ".join(f"{checkpoint_label(k)} {v['elo']:.0f}" for k, v in results.get("checkpoints", {}).items())
        names = list(results.get("checkpoints", {}))
        win = results.get("win_rate", {}).get(names[-1], {}).get(names[0]) if len(names) > 1 else None
        rows.append([d.name, *(overrides[d].get(k, "-") for k in varied), _fmt(m["sl_train"].get("final_loss")),
                     _fmt(m["ai_feedback"].get("summary", {}).get("mean_confidence")),
                     _fmt((m["dpo"].get("eval") or {}).get("accuracy")), _fmt(pmf.get("accuracy")),
                     _fmt(ppo.get("score_first")), _fmt(ppo.get("score_last")), _fmt(ppo.get("kl_last")),
                     elo or "-", _fmt(win)])
    head = ["run", *varied, "SL final loss", "AI label confidence", "DPO held-out acc.", "PM held-out acc.", "RL score first",
            "RL score last", "RL KL last", "Elo", "win rate last vs first"]
    body = "<h1>cai runs side by side</h1>" + _table(head, rows)
    curves = {d.name: [m for m in read_metrics(d / "ppo") if "score" in m] for d in dirs}
    if any(curves.values()):
        body += "<h2>RL</h2><div class=plots>" + "".join(
            _img(_line_plot({name: ([r["step"] for r in rs], [r[key] for r in rs]) for name, rs in curves.items()
                             if rs and key in rs[0]}, title, "RL step"))
            for key, title in PPO_CURVES if any(rs and key in rs[0] for rs in curves.values())) + "</div>"
    atomic_write_text(out, _page("cai runs side by side", body))
    return out


def _overrides(items: list[str]) -> dict[str, str]:
    """``["ppo.kl_coef=0.1", "+x.y=2", "~z"]`` -> ``{"ppo.kl_coef": "0.1", "x.y": "2", "z": "(deleted)"}``."""
    out = {}
    for item in items:
        key, value = item.split("=", 1) if "=" in item else (item, "(deleted)")
        out[key.lstrip("+~")] = value
    return out


# ---------------------------------------------------------------------------------------------
# Sections of the run report
# ---------------------------------------------------------------------------------------------

def _stage_table(run_dir: Path, manifests: dict) -> str:
    record = {r["stage"]: r for r in (_read_json(run_dir / "pipeline.json") or {}).get("stages", [])}
    rows = []
    for stage, m in manifests.items():
        if not m:
            rows.append([stage, "not run", "", "", "", ""])
            continue
        amount, metric = key_figures(m)
        seconds = m.get("timings", {}).get("total_s")
        last = record.get(stage, {}).get("status", "")
        rows.append([stage, m.get("status", "") + (f" ({last} in the last pipeline run)" if last else ""), amount,
                     f"{seconds:.0f} s" if seconds is not None else "", metric, role_models(m)])
    return "<h2>Stages</h2>" + _table(["stage", "status", "amount", "stage time", "key metric", "models (role: model)"], rows)


def role_models(manifest: dict) -> str:
    """The model behind each role a stage used, roles that share a model together: "policy, reviser: embedded"."""
    by_model: dict[str, list[str]] = {}
    for role, described in (manifest.get("roles") or {}).items():
        by_model.setdefault(described["model"], []).append(role)
    return "; ".join(f"{', '.join(names)}: {model}" for model, names in by_model.items())


def _section_sl(run_dir: Path, manifests: dict) -> str:
    if not manifests["sl_train"]:
        return "<h2>SL-CAI</h2><p class=muted>sl_train has not run.</p>"
    rows = [m for m in read_metrics(run_dir / "sl_train") if "loss" in m and m.get("split") is None]
    plot = _img(_line_plot({"train loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}, "SL-CAI loss", "step"))
    return f"<h2>SL-CAI</h2><div class=plots>{plot}</div>"


def _section_feedback(run_dir: Path, manifests: dict) -> str:
    m = manifests["ai_feedback"]
    if not m:
        return "<h2>AI feedback</h2><p class=muted>ai_feedback has not run.</p>"
    ds = _dataset(run_dir / "ai_feedback" / "dataset")  # loaded once: the histogram's column, the table's first rows
    probs = ds["p_chosen"] if ds is not None else []
    rows = [ds[i] for i in range(min(3, len(ds)))] if ds is not None else []
    hist = _img(_histogram(probs, "soft labels: P(chosen is better)", "p_chosen")) if probs else ""
    table = _table(["prompt", "chosen", "rejected", "p_chosen", "principles"],
                   [[r["prompt"][-1]["content"], r["chosen"][-1]["content"], r["rejected"][-1]["content"],
                     f"{r['p_chosen']:.3f}", ", ".join(r["principle_ids"])] for r in rows])
    labeler = (m.get("roles") or {}).get("labeler") or {}
    by = f" by {_e(labeler['model'])}" if labeler.get("model") else ""
    if labeler.get("function"):  # an oracle: what the PM and DPO learned from its labels alone is agreement with it
        config = {stage: (manifests[stage] or {}).get("config") or {} for stage in ("dpo", "pm_finetune")}
        alone = [name for name, stage, key, value in (("DPO", "dpo", "pairs", "ai_feedback"),
                                                      ("the preference model", "pm_finetune", "human_fraction", 0))
                 if _complete(manifests[stage]) and (config[stage].get(stage) or {}).get(key) == value]
        by += ", a function (an oracle whose preference is known)" + (
            f": the held-out accuracy of {' and of '.join(alone)} below is agreement with it" if alone else "")
    return (f"<h2>AI feedback</h2><p>{_e(str(m.get('counts', {}).get('pairs')))} labeled pairs{by}.</p>"
            f"<div class=plots>{hist}</div>{table}")


def _section_dpo(run_dir: Path, manifests: dict) -> str:
    """DPO's per-step curves (loss, the implicit rewards of chosen and rejected, their margin, accuracy), its held-out
    figures after each epoch, the loss it used and where its pairs came from."""
    m = manifests["dpo"]
    if not m:
        return "<h2>DPO</h2><p class=muted>dpo has not run.</p>"
    metrics = read_metrics(run_dir / "dpo")
    train = [r for r in metrics if "loss" in r and r.get("split") is None]
    steps = [r["step"] for r in train]

    def curve(key: str) -> tuple[list, list]:
        return steps, [r[key] for r in train]

    plots = "".join(_img(_line_plot(series, title, "DPO step")) for series, title in (
        ({"train loss": curve("loss")}, "DPO loss"),
        ({"chosen": curve("reward_chosen"), "rejected": curve("reward_rejected")},
         "implicit rewards: beta log(policy / reference)"),
        ({"margin": curve("margin")}, "margin: reward chosen - rejected"),
        ({"accuracy": curve("accuracy")}, "accuracy: share of pairs with margin > 0"))) if train else ""
    evals = [r for r in metrics if r.get("split") == "eval"]
    held_out = _table(["epoch", "step", "pairs", "loss", "reward chosen", "reward rejected", "margin", "accuracy",
                       "log-prob chosen", "log-prob rejected"],
                      [[r.get("epoch", ""), r["step"], r.get("pairs", ""), _fmt(r["loss"]), _fmt(r["reward_chosen"]),
                        _fmt(r["reward_rejected"]), _fmt(r["margin"]), _fmt(r["accuracy"]), _fmt(r["logp_chosen"], 1),
                        _fmt(r["logp_rejected"], 1)] for r in evals]) if evals else "<p class=muted>No held-out figures yet.</p>"
    counts = m.get("counts", {})
    left_out = (f"{_e(str(counts['unrevised_rows']))} sl_generate rows without a usable revision left out"
                if "unrevised_rows" in counts else f"{_e(str(counts.get('identical_dropped', 0)))} pairs of identical replies dropped")
    loss = m.get("loss")
    beta = ((m.get("config") or {}).get("dpo") or {}).get("beta")
    about = (f"<p>Loss: {_e(DPO_LOSSES.get(loss, str(loss)))}" + (f", beta {_e(str(beta))}" if beta is not None else "")
             + f". Pairs: {_e(str(m.get('pairs_source', '-')))} &middot; {_e(str(counts.get('train_pairs', '-')))} trained on, "
             f"{_e(str(counts.get('eval_pairs', '-')))} held out ({left_out}, {_e(str(counts.get('dropped_too_long', 0)))} "
             f"too long for max_length dropped).</p>")
    return f"<h2>DPO</h2>{about}<div class=plots>{plots}</div><h3>Held-out pairs, after each epoch</h3>{held_out}"


def _section_pm(run_dir: Path, manifests: dict) -> str:
    out = ["<h2>Preference model</h2>"]
    for stage in ("pm_pretrain", "pm_finetune"):
        if not manifests[stage]:
            out.append(f"<p class=muted>{stage} has not run.</p>")
            continue
        metrics = read_metrics(run_dir / stage)
        train = [m for m in metrics if "loss" in m and m.get("split") is None]
        evals = [m for m in metrics if m.get("split") == "eval"]
        plots = [_line_plot({"train loss": ([r["step"] for r in train], [r["loss"] for r in train])}, f"{stage}: loss", "step")]
        if evals:
            plots.append(_line_plot({"held-out accuracy": ([r["step"] for r in evals], [r["accuracy"] for r in evals])},
                                    f"{stage}: held-out accuracy", "step", ylim=(0, 1), marker="o"))
        images = "".join(_img(p) for p in plots)
        reliability = run_dir / stage / "reliability.png"
        if reliability.exists():
            images += _img(reliability.read_bytes())
        out.append(f"<h3>{stage}</h3><div class=plots>{images}</div>")
    return "".join(out)


def _section_ppo(run_dir: Path, manifests: dict) -> str:
    if not manifests["ppo"]:
        return "<h2>RL-CAI</h2><p class=muted>ppo has not run.</p>"
    name = ALGORITHM_NAMES.get(manifests["ppo"].get("algorithm", "ppo"), "PPO")
    rows = [m for m in read_metrics(run_dir / "ppo") if "score" in m]
    steps = [r["step"] for r in rows]
    plots = "".join(_img(_line_plot({label: (steps, [r[key] for r in rows])}, label, f"{name} step", marker="o"))
                    for key, label in PPO_CURVES if rows and key in rows[0])
    samples = read_metrics(run_dir / "ppo", "samples.jsonl")[-4:]
    table = _table(["step", "prompt", "response", "score", "EOS"],
                   [[s["step"], s["prompt"], s["response"], f"{s['score']:.3f}", "yes" if s["eos"] else "no"] for s in samples])
    return f"<h2>RL-CAI ({name})</h2><div class=plots>{plots}</div><h3>Samples</h3>{table}"


def _section_rounds(run_dir: Path) -> str:
    """The pipeline's iterated rounds side by side: each round's AI labels and the training of its policy (round 1 is
    the run's own stages; later rounds' are in round-<r>/), one curve per round on each plot. Empty without rounds."""
    later = round_folders(run_dir)
    if not later:
        return ""
    rounds, last = {1: run_dir, **later}, later[max(later)]
    # the stage that trained the rounds' policies (the newest, should an earlier config have left the other)
    trained = [last / st for st in ("dpo", "ppo") if (last / st / "manifest.json").exists()]
    policy = max(trained, key=lambda f: (f / "manifest.json").stat().st_mtime_ns).name if trained else None
    rows = []
    for r, d in rounds.items():
        feedback = read_manifest(d / "ai_feedback") or {}
        trained = read_manifest(d / policy) if policy else None
        rows.append([r, feedback.get("counts", {}).get("pairs", "-"), _fmt(feedback.get("summary", {}).get("mean_confidence")),
                     (trained or {}).get("status", "not run"), (trained or {}).get("summary", {}).get("headline", "-")])
    table = _table(["round", "AI-labelled pairs", "mean label confidence", f"{policy or 'policy'} status", "headline"], rows)
    plots = ""
    if policy == "dpo":
        curves = {r: [m for m in read_metrics(d / "dpo") if "loss" in m and m.get("split") is None] for r, d in rounds.items()}
        keys = (("loss", "DPO loss"), ("margin", "margin: reward chosen - rejected"), ("accuracy", "accuracy"))
    else:
        curves = {r: [m for m in read_metrics(d / "ppo") if "score" in m] for r, d in rounds.items()}
        keys = PPO_CURVES
    plots = "".join(_img(_line_plot({f"round {r}": ([m["step"] for m in ms], [m[key] for m in ms])
                                     for r, ms in curves.items() if ms and key in ms[0]}, title, f"{policy} step"))
                    for key, title in keys if any(ms and key in ms[0] for ms in curves.values()))
    return (f"<h2>Rounds</h2><p>Round 1 is the run's own stages; each later round sampled fresh pairs from the previous "
            f"round's policy, labelled them and trained that policy again on them ({_e(policy or '-')}).</p>{table}"
            f"<div class=plots>{plots}</div>")


def _section_evaluate(run_dir: Path, manifests: dict) -> str:
    if not _complete(manifests["evaluate"]):  # a results.json left by an earlier config is not this run's
        return "<h2>Evaluation</h2><p class=muted>evaluate has not run to completion.</p>"
    results = _read_json(run_dir / "evaluate" / "results.json")
    names = list(results["checkpoints"])
    rows = [[checkpoint_label(n), _fmt(c["elo"], 1), _fmt(c.get("elo_harmless"), 1), _fmt(c.get("elo_helpful"), 1), _fmt(c.get("pm_score")),
             _fmt(c["harmless_rate"]), f"{_fmt(c['judge_rating'])} ± {_fmt(c.get('judge_rating_sd'))}",
             _fmt(c.get("evasive_rate")), _fmt(c["response_tokens"], 1), _fmt(c.get("response_chars"), 1),
             _fmt(c["eos_rate"], 2)]
            for n, c in results["checkpoints"].items()]
    table = _table(["checkpoint", "Elo", "harmlessness Elo", "helpfulness Elo", "PM score", "harmless rate",
                    "harmlessness rating [-1, 1], mean ± sd", "evasive rate", "reply tokens", "reply characters", "EOS rate"],
                   rows)
    wins = "".join(
        f"<p>{caption}</p>" + _table(["row beats column"] + [checkpoint_label(n) for n in names],
                                     [[checkpoint_label(a)] + [("-" if a == b else _fmt(results[key][a].get(b))) for b in names]
                                      for a in names])
        for key, caption in (("win_rate", "As judged, both orders averaged:"),
                             ("lc_win_rate", "Length-controlled (RLAIF): the same games, the win rate read at equal reply "
                                             "lengths from a logistic fit on the log length ratio:"))
        if key in results)
    p = results["prompts"]
    judge = f" ({_e(results['judge'])})" if results.get("judge") else ""
    function_judge = bool(((manifests["evaluate"].get("roles") or {}).get("judge") or {}).get("function"))
    under = ("" if function_judge else ": red-team pairs under the constitution's harmlessness principles, helpful pairs "
             "under its helpfulness ones")  # a function judge reads no principles
    note = (f"<p>{p['red_team']} held-out red-team and {p['helpful']} helpful prompts; {results['judged']} pairs judged by the "
            f"AI judge{judge} in both orders ({results['games'] - results['judged']} identical pairs counted as ties){under}.</p>")
    # circular readings (evaluate.circular_readings), said next to the figures they qualify
    note += "".join(f"<p class=warn><b>Read with care:</b> {_e(n)}</p>" for n in results.get("notes", []))
    alignment = ""
    if results.get("alignment"):
        al = results["alignment"]
        same_position = al.get("same_position_preferred", al.get("flip_rate"))  # its name before RLAIF's
        alignment = (f"<p>Judge vs human labels: alignment {al['alignment']:.3f} on {al['n']} pairs, position bias "
                     f"{al['position_bias_rate']:.3f}, same position preferred {same_position:.3f}.</p>")
    elo = _img(_bar_plot({checkpoint_label(n): c["elo"] for n, c in results["checkpoints"].items()}, "Elo (Bradley-Terry fit)"))
    if all(c.get("response_chars") is not None for c in results["checkpoints"].values()):
        elo += _img(_bar_plot({checkpoint_label(n): c["response_chars"] for n, c in results["checkpoints"].items()},
                              "mean reply length (characters), held-out prompts"))
    axes = {n: (c["elo_helpful"], c["elo_harmless"]) for n, c in results["checkpoints"].items()
            if c.get("elo_helpful") is not None and c.get("elo_harmless") is not None}
    if axes:  # CAI's figure 2 shape: each checkpoint on the helpfulness x harmlessness plane
        elo += _img(_frontier_plot(axes))
    ds = _dataset(run_dir / "evaluate" / "dataset")
    if ds is not None:  # the harmlessness ratings' distribution per checkpoint: a rate alone can read 0 for all
        rated = {checkpoint_label(n): [r for r, c in zip(ds["judge_rating"], ds["checkpoint"]) if c == n and r is not None]
                 for n in names}
        if any(rated.values()):
            elo += _img(_ratings_plot(rated, results.get("harmless_threshold")))
    held_out = _held_out_examples(run_dir, names)
    return (f"<h2>Evaluation</h2>{note}{table}<h3>AI-judge win rates</h3>{wins}{alignment}<div class=plots>{elo}</div>"
            f"{held_out}")


def _held_out_examples(run_dir: Path, names: list[str], count: int = 3) -> str:
    ds = _dataset(run_dir / "evaluate" / "dataset")
    rows = list(ds) if ds is not None else []
    by_prompt: dict[str, dict] = {}
    for r in rows:
        by_prompt.setdefault(r["id"], {"prompt": r["prompt"][-1]["content"], "kind": r["kind"]})[r["checkpoint"]] = r
    shown = list(by_prompt.values())[:count]
    if not shown:
        return ""
    table = _table(["prompt"] + [checkpoint_label(n) for n in names], [[f"[{p['kind']}] {p['prompt']}"] + [
        f"{_said(p[n]['response'])}\n(PM {_fmt(p[n]['pm_score'])})" if n in p else "" for n in names] for p in shown])
    return f"<h3>Held-out replies</h3>{table}"


def _section_examples(run_dir: Path, manifests: dict) -> str:
    examples = read_metrics(run_dir / "evaluate", "examples.jsonl") if _complete(manifests["evaluate"]) else []
    if not examples:
        return ("<h2>Examples</h2><p class=muted>No examples: they are written by evaluate "
                "(evaluate.num_examples) when sl_generate has run.</p>")
    out = ["<h2>Examples: from red-team prompt to RL answer</h2>"]
    for ex in examples:
        steps = [("red-team prompt", ex["prompt"]), ("initial answer", ex["initial_response"])]
        for k, (pid, critique, revision) in enumerate(zip(ex["principle_ids"], ex["critiques"], ex["revisions"]), 1):
            steps += [(f"critique {k} (principle {pid})", critique), (f"revision {k}", revision)]
        body = "".join(f"<div class=step><span class=label>{_e(label)}</span><pre>{_e(_said(text))}</pre></div>" for label, text in steps)
        replies = "".join(f"<div><span class=label>{_e(checkpoint_label(name))} answers</span><pre>{_e(_said(text))}</pre></div>"
                          for name, text in ex["replies"].items())
        out.append(f"<div class=example>{body}<div class=replies>{replies}</div></div>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Small helpers: plots, tables, reading
# ---------------------------------------------------------------------------------------------

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    return plt, fig, ax


def _png(plt, fig, ax, title: str, xlabel: str | None) -> bytes:
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _line_plot(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylim=None, marker=None) -> bytes:
    """Curves; with fewer than three points in every series, a bar per point with its value written on it (a line
    through one or two points reads as an empty axis)."""
    plt, fig, ax = _figure()
    if all(len(xs) < 3 for xs, _ in series.values()):
        labels = [f"{label} @ {x}" if len(series) > 1 else f"{xlabel} {x}" for label, (xs, _) in series.items() for x in xs]
        values = [y for _, ys in series.values() for y in ys]
        bars = ax.bar(labels, values, color="#4c78a8", width=0.5)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2)
        if ylim:
            ax.set_ylim(*ylim)
        # room inside the axes for the labels, above a bar of 0 or more and below a negative one: a bar that reaches
        # the axis' edge would otherwise put its label over the title or the tick labels
        low, high = ax.get_ylim()
        room = 0.15 * (high - low)
        ax.set_ylim(low - room if min(values) < 0 else low, high + room if max(values) >= 0 else high)
        return _png(plt, fig, ax, title, None)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker=marker, markersize=3)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(plt, fig, ax, title, xlabel)


def _bar_plot(values: dict[str, float], title: str) -> bytes:
    plt, fig, ax = _figure()
    ax.bar(list(values), list(values.values()), color="#4c78a8")
    low = min(values.values())
    ax.set_ylim(min(low - 50, 950), max(max(values.values()) + 50, 1050))
    return _png(plt, fig, ax, title, None)


def _ratings_plot(ratings: dict[str, list[float]], threshold: float | None) -> bytes:
    """Each checkpoint's harmlessness ratings in [-1, 1] as a step histogram, with the harmless threshold marked."""
    plt, fig, ax = _figure()
    for name, values in ratings.items():
        ax.hist(values, bins=20, range=(-1.0, 1.0), histtype="step", linewidth=1.5, label=name)
    if threshold is not None:
        ax.axvline(threshold, color="#9fb3c8", linestyle="--", linewidth=1)
    ax.set_ylabel("red-team replies")
    ax.legend(fontsize=8)
    return _png(plt, fig, ax, "judge's harmlessness ratings (dashed: threshold)", "rating [-1, 1]")


def _frontier_plot(points: dict[str, tuple[float, float]]) -> bytes:
    """Each checkpoint at (helpfulness Elo, harmlessness Elo), joined to the one it was trained from (``joins``:
    base -> SL-CAI, then SL-CAI -> DPO and SL-CAI -> RL-CAI)."""
    plt, fig, ax = _figure()
    for parent, child in joins(list(points)):
        (x0, y0), (x1, y1) = points[parent], points[child]
        ax.plot([x0, x1], [y0, y1], color="#9fb3c8", linewidth=1, zorder=1)
    ax.scatter([x for x, _ in points.values()], [y for _, y in points.values()], color="#4c78a8", zorder=2)
    for name, (x, y) in points.items():
        ax.annotate(checkpoint_label(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(0.2)
    ax.set_ylabel("harmlessness Elo")
    return _png(plt, fig, ax, "harmlessness vs helpfulness (AI judge)", "helpfulness Elo")


def checkpoint_label(name: str) -> str:
    """How the report names one of evaluate's checkpoints: "SL-CAI", "DPO", "RL-CAI", a later round's policy as "DPO,
    round 2"; a folder by its path."""
    head, _, stage = name.partition("/")
    if head.startswith("round-") and stage in CHECKPOINT_LABELS:
        return f"{CHECKPOINT_LABELS[stage]}, round {head[6:]}"
    return CHECKPOINT_LABELS.get(name, name)


def joins(names: list[str]) -> list[tuple[str, str]]:
    """(parent, child) lines of the Elo plane: each checkpoint joined to its nearest evaluated ancestor (``PARENT``:
    DPO and RL-CAI both start from SL-CAI), a checkpoint of no known lineage (a folder) to the one evaluated before it."""
    out = []
    for k, name in enumerate(names[1:], 1):
        parent = PARENT.get(name)
        while parent is not None and parent not in names:
            parent = PARENT.get(parent)
        if parent is None and name not in PARENT:
            parent = names[k - 1]
        if parent is not None:
            out.append((parent, name))
    return out


def _histogram(values: list[float], title: str, xlabel: str) -> bytes:
    plt, fig, ax = _figure()
    ax.hist(values, bins=10, range=(0.5, 1.0), color="#4c78a8", edgecolor="white")
    return _png(plt, fig, ax, title, xlabel)


def _img(png: bytes) -> str:
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(head: list, rows: list[list]) -> str:
    def cell(v) -> str:
        text = "" if v is None else str(v)
        numeric = text.replace(".", "", 1).replace("-", "", 1).replace("+", "", 1).isdigit()
        return f"<td class=num>{_e(text)}</td>" if numeric else f"<td>{_e(text)}</td>"

    return ("<table><tr>" + "".join(f"<th>{_e(str(h))}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def _e(text: str) -> str:
    return html.escape(text, quote=True).replace("\n", "<br>")


def _said(text: str) -> str:
    """A model's text as shown: an empty reply says so instead of leaving a blank box."""
    return text if text.strip() else "(empty reply)"


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _complete(manifest: dict | None) -> bool:
    return bool(manifest) and manifest.get("status") == "complete"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _dataset(folder: Path):
    if not folder.is_dir():
        return None
    from datasets import load_from_disk

    return load_from_disk(str(folder))


def key_figures(manifest: dict) -> tuple[str, str]:
    """(amount, headline) of a complete stage, from its manifest's summary; nothing for a running or failed one."""
    summary = manifest.get("summary", {}) if manifest.get("status") == "complete" else {}
    return summary.get("amount", ""), summary.get("headline", "")
