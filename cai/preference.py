"""Preference models: comparison data, the pairwise losses, held-out evaluation and scoring.

A preference model (PM) is a causal-LM backbone with a one-output head (``...ForSequenceClassification``);
its score for a conversation is read at the last real token of "chat-template prompt + response + EOS"
(``encode_chat``), the same tokens a policy produces, so PPO can score its samples the same way.

Comparison sources (``load_comparisons``), each a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file,
a ``save_to_disk`` folder or a ``datasets`` name, in one of three formats (``auto`` picks by columns):

- ``stack_exchange``: ``question`` + ``answers`` (a list of ``{text, score}``; ``pm_score`` is read when
  ``score`` is absent). Answers are paired when their scores differ by at least ``min_score_gap``; the
  higher score is chosen; at most ``pairs_per_question`` pairs per question (a seeded draw).
- ``hh``: ``chosen``/``rejected`` transcripts ("\\n\\nHuman: … \\n\\nAssistant: …") that share every
  turn but the last assistant one.
- ``pairs``: ``prompt``/``chosen``/``rejected``, each a string or TRL's conversational list of
  ``{role, content}``, and optionally ``p_chosen`` (a soft label in [0, 1]; 1 when absent).

Pairs whose two responses are identical carry no preference: they are dropped and counted.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cai.data import DataError, parse_hh_transcript, read_table
from cai.errors import StageInputError
from cai.files import atomic_write_bytes, atomic_write_json
from cai.models import preference_scores
from cai.training import check_train_settings, encode_chat, keep_left, pad_batch

BUILTIN = Path(__file__).parent / "prompts"
BUILTIN_PRETRAIN = BUILTIN / "stack_comparisons.jsonl"   # Stack-Exchange-style questions with voted answers
BUILTIN_HUMAN = BUILTIN / "helpful_pairs.jsonl"          # human-written helpfulness comparisons
FORMATS = ("auto", "stack_exchange", "hh", "pairs")
SHIFT_KEY = "cai_reward_shift"  # PM config attribute: added to every raw score (reward normalisation)


@dataclass(frozen=True)
class Comparison:
    id: str
    prompt: tuple          # ({role, content}, ...) ending with the user's turn
    chosen: str            # the better response (p_chosen >= 0.5)
    rejected: str
    p_chosen: float = 1.0  # target P(chosen better): 1.0 for a hard (human or vote) label

    def messages(self) -> list[dict]:
        return [dict(m) for m in self.prompt]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_comparisons(source: str | None, fmt: str, *, key: str, builtin: Path, seed: int,
                     pairs_per_question: int = 2, min_score_gap: float = 1.0) -> tuple[list[Comparison], int]:
    """``(comparisons, identical_dropped)`` from ``source`` (None: ``builtin``); ``key`` names the config
    key in error messages. Soft labels below 0.5 are flipped so ``chosen`` is always the preferred one."""
    if fmt not in FORMATS:
        raise DataError(f"{key}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    where = str(source) if source else str(builtin)
    table = read_table(source or builtin, where)
    columns = set(table.column_names)
    if fmt == "auto":
        fmt = ("stack_exchange" if {"question", "answers"} <= columns else "pairs" if {"prompt", "chosen", "rejected"} <= columns
               else "hh" if {"chosen", "rejected"} <= columns else None)
        if fmt is None:
            raise DataError(f"{where}: cannot tell the comparison format from the columns ({', '.join(sorted(columns))}); "
                            f"expected question+answers, prompt+chosen+rejected, or chosen+rejected transcripts")
    needed = {"stack_exchange": {"question", "answers"}, "hh": {"chosen", "rejected"}, "pairs": {"prompt", "chosen", "rejected"}}[fmt]
    if not needed <= columns:
        raise DataError(f"{where}: format {fmt} needs columns {', '.join(sorted(needed))} (columns: {', '.join(sorted(columns))})")
    rows = table.to_list()
    if not rows:
        raise DataError(f"{where}: no rows")
    out: list[Comparison] = []
    rng = random.Random(f"cai-comparisons:{seed}")
    for i, row in enumerate(rows):
        if fmt == "stack_exchange":
            out += _stack_exchange_row(row, i, where, pairs_per_question, min_score_gap, rng)
        elif fmt == "hh":
            out.append(_hh_row(row, i, where))
        else:
            out.append(_pairs_row(row, i, where))
    kept = [c for c in out if c.chosen.strip() != c.rejected.strip()]
    if not kept:
        raise DataError(f"{where}: no usable comparisons (every pair had identical responses, or no answers "
                        f"differed by {min_score_gap} votes)")
    return kept, len(out) - len(kept)


def stack_exchange_pairs(scores: list[float], pairs_per_question: int, min_score_gap: float, rng: random.Random) -> list[tuple[int, int]]:
    """(better, worse) answer indices: every pair whose scores differ by >= ``min_score_gap``, then a seeded
    draw of at most ``pairs_per_question`` of them (in index order)."""
    pairs = [(i, j) if scores[i] > scores[j] else (j, i)
             for i in range(len(scores)) for j in range(i + 1, len(scores)) if abs(scores[i] - scores[j]) >= min_score_gap]
    if len(pairs) > pairs_per_question:
        pairs = sorted(rng.sample(pairs, pairs_per_question))
    return pairs


def _stack_exchange_row(row: dict, i: int, where: str, per_question: int, gap: float, rng: random.Random) -> list[Comparison]:
    question, answers = row["question"], row["answers"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: row {i} 'question' is not a non-empty string")
    if not isinstance(answers, list):
        raise DataError(f"{where}: row {i} 'answers' is not a list")
    texts, scores = [], []
    for j, a in enumerate(answers):
        score = a.get("score", a.get("pm_score")) if isinstance(a, dict) else None
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not _is_number(score):
            raise DataError(f"{where}: row {i} answer {j} needs a string 'text' and a numeric 'score' (or 'pm_score')")
        texts.append(a["text"])
        scores.append(float(score))
    prompt = ({"role": "user", "content": question.strip()},)
    return [Comparison(f"row{i}-{a}-{b}", prompt, texts[a].strip(), texts[b].strip())
            for a, b in stack_exchange_pairs(scores, per_question, gap, rng)]


def _hh_row(row: dict, i: int, where: str) -> Comparison:
    for col in ("chosen", "rejected"):
        if not isinstance(row[col], str):
            raise DataError(f"{where}: row {i} column {col!r} is {type(row[col]).__name__}, not a transcript string")
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise DataError(f"{where}: row {i} transcripts must end with an 'Assistant:' turn")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: row {i} chosen and rejected differ before their last assistant turn")
    return Comparison(f"row{i}", tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])


def _pairs_row(row: dict, i: int, where: str) -> Comparison:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not _is_chat(prompt) or not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: row {i} 'prompt' must be a string or a list of {{role, content}} ending with a user turn")
    responses = []
    for col in ("chosen", "rejected"):
        value = row[col]
        if isinstance(value, list) and _is_chat(value) and len(value) == 1 and value[0]["role"] == "assistant":
            value = value[0]["content"]
        if not isinstance(value, str):
            raise DataError(f"{where}: row {i} column {col!r} must be a string or one assistant message")
        responses.append(value)
    p = row["p_chosen"] if "p_chosen" in row else 1.0
    if not _is_number(p) or not 0.0 <= float(p) <= 1.0:
        raise DataError(f"{where}: row {i} 'p_chosen' must be a number in [0, 1], got {p!r}")
    p = float(p)
    chosen, rejected = responses if p >= 0.5 else responses[::-1]
    return Comparison(str(row.get("id") or f"row{i}"), tuple({"role": m["role"], "content": m["content"]} for m in prompt),
                      chosen, rejected, max(p, 1.0 - p))


def _is_chat(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str) for m in value)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def split_holdout(items: list, fraction: float, seed: int, what: str, key: str) -> tuple[list, list]:
    """A seeded (train, held-out) split with ``round(len * fraction)`` held out (at least 1); both must be
    non-empty."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{key} must be in (0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(f"cai-holdout:{seed}:{what}").shuffle(order)
    n_eval = max(1, round(len(items) * fraction))
    if len(items) - n_eval < 1:
        raise DataError(f"{key}={fraction}: {len(items)} {what} comparison(s) leave an empty training split")
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    p_chosen: float
    truncated: bool  # the context was cut from the left to fit


def encode_pair(tok, c: Comparison, max_length: int) -> EncodedPair | None:
    """Both sides as prompt + response + EOS; a context too long is cut from the left. None when a response
    alone does not fit (the caller drops and counts it: a response is never cut)."""
    sides, cut = [], False
    for response in (c.chosen, c.rejected):
        prompt_ids, reply_ids = encode_chat(tok, c.messages(), response)
        if len(reply_ids) >= max_length:
            return None
        prompt_ids, was_cut = keep_left(prompt_ids, len(reply_ids), max_length)
        sides.append(prompt_ids + reply_ids)
        cut = cut or was_cut
    return EncodedPair(sides[0], sides[1], c.p_chosen, cut)


def encode_pairs(tok, comparisons: list[Comparison], max_length: int, where: str) -> tuple[list[EncodedPair], dict]:
    """Every comparison that fits, and counts for the manifest: contexts cut from the left
    (``truncated_context``) and pairs dropped because a response alone exceeds ``max_length``
    (``dropped_too_long``). Refuses when nothing fits."""
    encoded = [encode_pair(tok, c, max_length) for c in comparisons]
    kept = [e for e in encoded if e is not None]
    if comparisons and not kept:
        raise DataError(f"{where}: every response is longer than max_length={max_length} tokens; raise it")
    return kept, {"truncated_context": sum(e.truncated for e in kept), "dropped_too_long": len(encoded) - len(kept)}


def pair_batch_loss(model, pairs: list[EncodedPair], pad_id: int, hard_margin: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean ``preference_loss`` of a micro-batch (chosen and rejected sides scored in one forward pass),
    with the batch's accuracy, mean margin and token count as stats."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    scores = preference_scores(model, ids.to(device), mask.to(device))  # (2B,)
    d = scores[:len(pairs)] - scores[len(pairs):]
    target = torch.tensor([p.p_chosen for p in pairs], device=device)
    loss = preference_loss(d, target, hard_margin).mean()
    return loss, {"accuracy": pair_accuracy(d.tolist(), target.tolist()), "margin": d.mean().item(),
                  "tokens": int(mask.sum())}


def held_out_margins(model, pairs: list[EncodedPair], pad_id: int, batch_size: int = 8) -> list[float]:
    """r_chosen - r_rejected for every pair (no gradient)."""
    scores = score_sequences(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, batch_size)
    return [a - b for a, b in zip(scores[:len(pairs)], scores[len(pairs):])]


# ---------------------------------------------------------------------------------------------
# Maths (pure)
# ---------------------------------------------------------------------------------------------

def preference_loss(margin: torch.Tensor, p_chosen: torch.Tensor, hard_margin: float = 0.0) -> torch.Tensor:
    """(B,) score differences r_chosen - r_rejected and (B,) targets -> (B,) losses.

    Binary cross-entropy of sigma(d) against p: -[p log sigma(d) + (1 - p) log sigma(-d)]. For a hard
    label (p = 1) this is the PM loss -log sigma(r_good - r_bad), with the optional margin m subtracted
    first: -log sigma(d - m). Its gradient in d is sigma(d) - p, zero where the PM already says p.
    """
    d = margin - hard_margin * (p_chosen == 1.0).to(margin.dtype)
    return F.binary_cross_entropy_with_logits(d, p_chosen.to(d.dtype), reduction="none")


def pair_accuracy(margins: list[float], p_chosen: list[float]) -> float:
    """Share of pairs with a preference (p != 0.5) whose score difference points the same way
    (a zero difference counts half)."""
    hits = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d, p in zip(margins, p_chosen) if p != 0.5]
    return sum(hits) / len(hits) if hits else float("nan")


def reliability_bins(predicted: list[float], target: list[float], bins: int) -> list[dict]:
    """Calibration table of P(chosen better) = sigma(d) against the targets.

    Each pair enters twice, as (q, t) and (1 - q, 1 - t), so the table does not depend on which response
    is called "chosen". Returns one row per non-empty bin of equal width over [0, 1]:
    {lo, hi, count, confidence (mean q), observed (mean t)}.
    """
    points = [(q, t) for q, t in zip(predicted, target)] + [(1 - q, 1 - t) for q, t in zip(predicted, target)]
    rows = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(q, t) for q, t in points if lo <= q < hi or (b == bins - 1 and q == 1.0)]
        if inside:
            rows.append({"lo": lo, "hi": hi, "count": len(inside), "confidence": sum(q for q, _ in inside) / len(inside),
                         "observed": sum(t for _, t in inside) / len(inside)})
    return rows


def expected_calibration_error(table: list[dict]) -> float:
    """sum over bins of (count / total) * |confidence - observed|."""
    total = sum(r["count"] for r in table)
    return sum(r["count"] / total * abs(r["confidence"] - r["observed"]) for r in table) if total else float("nan")


def evaluate_margins(margins: list[float], p_chosen: list[float], bins: int) -> tuple[dict, list[dict]]:
    """Held-out metrics (accuracy, mean_margin, ece, pairs) and the reliability table."""
    predicted = [1.0 / (1.0 + math.exp(-d)) for d in margins]
    table = reliability_bins(predicted, p_chosen, bins)
    metrics = {"accuracy": round(pair_accuracy(margins, p_chosen), 6),
               "mean_margin": round(sum(margins) / len(margins), 6) if margins else float("nan"),
               "ece": round(expected_calibration_error(table), 6), "pairs": len(margins)}
    return metrics, table


def save_reliability_png(table: list[dict], path: Path, title: str) -> None:
    """A reliability diagram: observed preference rate against the PM's confidence, per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect calibration")
    if table:
        ax.bar([(r["lo"] + r["hi"]) / 2 for r in table], [r["observed"] for r in table], width=table[0]["hi"] - table[0]["lo"],
               edgecolor="#1f4e79", color="#9dc3e6", label="observed")
        ax.plot([r["confidence"] for r in table], [r["observed"] for r in table], "o", color="#1f4e79", markersize=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("PM confidence  sigma(r_a - r_b)")
    ax.set_ylabel("target preference rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# What pm_pretrain and pm_finetune share
# ---------------------------------------------------------------------------------------------

def check_pm_settings(stage: str, s) -> None:
    """The checks pm_pretrain and pm_finetune share (before either touches its folder)."""
    check_train_settings(stage, s)
    if s.max_length is None or s.max_length < 4:
        raise StageInputError(f"{stage}.max_length must be >= 4, got {s.max_length}")
    if s.margin is None or s.margin < 0:
        raise StageInputError(f"{stage}.margin must be >= 0, got {s.margin}")
    if s.calibration_bins is None or s.calibration_bins < 1:
        raise StageInputError(f"{stage}.calibration_bins must be >= 1, got {s.calibration_bins}")


def held_out_evaluator(engine, tok, pairs: list[EncodedPair], bins: int, out: Path, title: str, main_rank: bool,
                       groups: dict[str, list[int]] | None = None):
    """``after_epoch`` for ``training.fit``: held-out accuracy, mean margin and ECE (also per group of pair
    indices, e.g. ``{"ai": [...], "human": [...]}``); rank 0 rewrites ``eval.json`` and ``reliability.png``."""

    def evaluate(epoch: int) -> dict:
        margins = held_out_margins(engine.module, pairs, tok.pad_token_id)
        targets = [p.p_chosen for p in pairs]
        metrics, table = evaluate_margins(margins, targets, bins)
        for name, idx in (groups or {}).items():
            if idx:
                metrics[f"accuracy_{name}"] = round(pair_accuracy([margins[i] for i in idx], [targets[i] for i in idx]), 6)
        if main_rank:
            save_reliability_png(table, out / "reliability.png", f"{title} (epoch {epoch}, ECE {metrics['ece']:.3f})")
            atomic_write_json(out / "eval.json", {"epoch": epoch, **metrics, "reliability": table})
        return metrics

    return evaluate


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def reward_shift(model) -> float:
    """The constant added to raw scores (reward normalisation), from the PM's config; 0 when absent."""
    return float(getattr(model.config, SHIFT_KEY, 0.0) or 0.0)


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Raw PM scores (no shift) of token sequences, read at each one's last token; batches are formed in
    length order to cut padding, results come back in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([sequences[i] for i in chunk], pad_id)
        for i, s in zip(chunk, preference_scores(model, ids.to(device), mask.to(device)).tolist()):
            scores[i] = s
    return scores


def score_conversations(model, tok, conversations: list[list[dict]], max_length: int = 1024, batch_size: int = 8) -> torch.Tensor:
    """(N,) rewards for conversations that end with an assistant turn: the PM's score at the last real
    token of "chat prompt + reply + EOS" plus the checkpoint's reward shift.

    ``model`` is the PM as loaded by ``AutoModelForSequenceClassification.from_pretrained(folder)`` (or
    ``cai.models.load_preference_model``); ``tok`` its tokenizer. Too-long contexts are cut from the left.
    """
    sequences = []
    for n, conv in enumerate(conversations):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"conversation {n} must end with an assistant turn")
        prompt_ids, reply_ids = encode_chat(tok, conv[:-1], conv[-1]["content"])
        if len(reply_ids) >= max_length:
            raise ValueError(f"conversation {n}: the reply alone is {len(reply_ids)} tokens, max_length is {max_length}")
        prompt_ids, _ = keep_left(prompt_ids, len(reply_ids), max_length)
        sequences.append(prompt_ids + reply_ids)
    was_training = model.training
    model.eval()
    raw = score_sequences(model, sequences, tok.pad_token_id, batch_size)
    model.train(was_training)
    return torch.tensor(raw) + reward_shift(model)
