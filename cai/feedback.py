"""The AI labeler's maths: soft preference labels from one prefill, and direct 1..10 scores.

Reading an option's probability needs the id of the token the model would emit for it. Tokenizers
differ: SmolLM2 emits " (" then "A" as separate tokens, others merge "(A" into one. ``option_tokens``
handles both without knowing which: it tokenizes ``text + option`` for every option, takes their
longest common prefix as the context the model is run on, and the first token after it as each
option's token. One forward pass over the context gives every option's log-probability.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from cai.constitution import OPTION_LABELS, PREAMBLES
from cai.data import jsonl_rows, parse_hh_transcript
from cai.engines import FunctionLabeler
from cai.errors import DataError, LabelerError, StageInputError
from cai.generation import Engine
from cai.models import position_ids_from_mask


def option_tokens(tok, text: str, options: Sequence[str]) -> tuple[list[int], list[int]]:
    """(context ids, one token id per option) for reading ``options`` right after ``text``."""
    encoded = [tok(text + option, add_special_tokens=False)["input_ids"] for option in options]
    common = _common_prefix_length(encoded)
    if any(len(ids) <= common for ids in encoded):
        raise LabelerError(f"options {list(options)} cannot be told apart by their first token after {text[-30:]!r}")
    firsts = [ids[common] for ids in encoded]
    if len(set(firsts)) != len(firsts):
        raise LabelerError(f"options {list(options)} share their first token after {text[-30:]!r}")
    return encoded[0][:common], firsts


@torch.no_grad()
def next_token_logprobs(model, contexts: Sequence[list[int]], candidates: Sequence[list[int]], pad_id: int,
                        batch_size: int = 8) -> list[list[float]]:
    """log p(candidate | context) for each context's candidate tokens: one forward pass per context
    (batched, left-padded, positions from the mask so padding changes nothing), no decoding.

    Contexts are sorted by length so each batch carries little padding; results come back in input order. A
    ``cai.generation.Engine`` (vLLM, a server) reads them from one generated step per context instead.
    """
    if isinstance(model, Engine):
        return model.next_token_logprobs(contexts, candidates)
    device = next(model.parameters()).device
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    out: list[list[float] | None] = [None] * len(contexts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(contexts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[row, width - len(contexts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        for row, i in enumerate(idx):
            out[i] = logprobs[row, candidates[i]].tolist()
    return out  # type: ignore[return-value]


@torch.no_grad()
def shared_prefix_logprobs(model, contexts: Sequence[list[int]], candidates: Sequence[list[int]], groups: Sequence,
                           pad_id: int) -> list[list[float]]:
    """As ``next_token_logprobs``, but shared prefixes are paid for once, at two levels:

    - the prefix common to *every* context (system prompt, few-shot exemplars, the template's opening) is
      run once per call;
    - on a copy of its KV cache, each group's (one pair's principles and both orders) common prefix — the
      conversation — is run once, the cache repeated for every member, and only each member's own
      remaining tokens are run on top (right-padded, positions continuing the prefix).

    Gives the same numbers as running every context in full (tested). A ``cai.engines.VLLMEngine`` gets every context
    whole: its prefix cache does the sharing.
    """
    import copy

    if isinstance(model, Engine):
        return model.next_token_logprobs(contexts, candidates)

    members_of: dict = {}
    for i, g in enumerate(groups):
        members_of.setdefault(g, []).append(i)
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(contexts)
    if not contexts:
        return []
    from transformers import DynamicCache

    from cai.models import cache_keyword

    key = cache_keyword(model)  # the keyword this transformers version's forward takes for the KV cache

    def prefill(ids: list[int], start: int, cache):
        """Run ``ids`` (positions ``start``..) into ``cache`` and return it."""
        model(input_ids=torch.tensor([ids], device=device), use_cache=True,
              cache_position=torch.arange(start, start + len(ids), device=device), **{key: cache})
        return cache

    common = min(_common_prefix_length(contexts), min(len(q) for q in contexts) - 1)
    common_cache = prefill(contexts[0][:common], 0, DynamicCache()) if common >= 1 else None
    for members in members_of.values():
        seqs = [contexts[i] for i in members]
        shared = min(_common_prefix_length(seqs), min(len(q) for q in seqs) - 1)  # each keeps >= 1 own token
        if common_cache is not None:
            cache = copy.deepcopy(common_cache)
            if shared > common:
                prefill(seqs[0][common:shared], common, cache)
        elif shared >= 1:
            cache = prefill(seqs[0][:shared], 0, DynamicCache())
        else:
            for i, lp in zip(members, next_token_logprobs(model, seqs, [candidates[i] for i in members], pad_id)):
                out[i] = lp
            continue
        cache.batch_repeat_interleave(len(seqs))
        tails = [q[shared:] for q in seqs]
        width = max(len(t) for t in tails)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for row, tail in enumerate(tails):
            ids[row, :len(tail)] = torch.tensor(tail)
            mask[row, shared:shared + len(tail)] = 1
        positions = torch.arange(shared, shared + width, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.expand(len(seqs), width),
                       cache_position=positions, **{key: cache}).logits  # (B, W, V)
        last = logits[torch.arange(len(seqs), device=device), torch.tensor([len(t) - 1 for t in tails], device=device)]
        logprobs = torch.log_softmax(last.float(), dim=-1)  # (B, V)
        for row, i in enumerate(members):
            out[i] = logprobs[row, candidates[i]].tolist()
    return out  # type: ignore[return-value]


def _common_prefix_length(seqs: Sequence[list[int]]) -> int:
    n = 0
    while all(len(q) > n for q in seqs) and len({q[n] for q in seqs}) == 1:
        n += 1
    return n


def two_way_probability(logprob_first: float, logprob_second: float) -> float:
    """Softmax over just two options: P(first) = e^a / (e^a + e^b)."""
    return 1.0 / (1.0 + math.exp(logprob_second - logprob_first))


def swap_average(p_first_shown_first: float, p_first_shown_second: float) -> float:
    """P(response 1 is better) from both orders: shown as (A) it won with ``p_first_shown_first``; shown
    as (B), the labeler's P(B) is ``p_first_shown_second``. Averaging cancels a pure position bias."""
    return 0.5 * (p_first_shown_first + p_first_shown_second)


def clamp(p: float, low: float, high: float) -> float:
    return min(max(p, low), high)


def normalised_score(logprobs: Sequence[float]) -> float:
    """Direct RLAIF: log-probs of the scores 1..N -> expected score under their softmax, mapped to [-1, 1]
    (1 -> -1, N -> +1)."""
    n = len(logprobs)
    probs = torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=0)
    expected = float((probs * torch.arange(1, n + 1, dtype=torch.float64)).sum())
    return 2.0 * (expected - 1.0) / (n - 1) - 1.0


# ---------------------------------------------------------------------------------------------
# Judging pairs: every principle, both orders, optional chain of thought
# ---------------------------------------------------------------------------------------------

@dataclass
class Judgement:
    p_a: float                  # P(response_a is better): mean over principles of both orders' average
    p_order_ab: list[float]     # per principle: P(a better) when a is shown as (A)
    p_order_ba: list[float]     # per principle: P(a better) when a is shown as (B) (= the labeler's P(B))
    principle_ids: list[str]
    rationales: list[str] = field(default_factory=list)  # CoT only: per principle, order ab then ba


@dataclass
class Pair:
    key: str                    # stable id: seeds the principle draw
    conversation: list[dict]    # the context before the two responses (ends with a user turn)
    response_a: str
    response_b: str


def judging(s, cfg) -> dict:
    """``judge_pairs``' settings from ``ai_feedback``'s keys (``s``), checked: ai_feedback and label_alignment judge
    alike. Raises ``StageInputError`` naming the key."""
    key = "ai_feedback"
    if s.n_principles < 1:
        raise StageInputError(f"{key}.n_principles must be >= 1, got {s.n_principles}")
    if not 0.0 <= s.cot_clamp[0] <= s.cot_clamp[1] <= 1.0:
        raise StageInputError(f"{key}.cot_clamp must be [low, high] within [0, 1], got {list(s.cot_clamp)}")
    if s.exemplar_principles not in ("query", "independent"):
        raise StageInputError(f"{key}.exemplar_principles must be query or independent, got {s.exemplar_principles!r}")
    if not isinstance(s.self_consistency, int) or s.self_consistency < 1:
        raise StageInputError(f"{key}.self_consistency must be an integer >= 1, got {s.self_consistency!r}")
    if s.self_consistency > 1 and not (s.cot and s.cot_temperature > 0):
        raise StageInputError(f"{key}.self_consistency={s.self_consistency} samples rationales: it needs {key}.cot=true "
                              f"and {key}.cot_temperature > 0")
    if s.preamble not in PREAMBLES:
        raise StageInputError(f"{key}.preamble must be one of {', '.join(PREAMBLES)}, got {s.preamble!r}")
    return dict(preamble=s.preamble, n_principles=s.n_principles, seed=cfg.seed, cot=s.cot, cot_clamp=s.cot_clamp, few_shot=s.few_shot,
                max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size, progress=cfg.progress,
                exemplar_principles=s.exemplar_principles, self_consistency=s.self_consistency,
                cot_temperature=s.cot_temperature)


def judge_pairs(model, tok, constitution, pairs: Sequence[Pair], *, n_principles: int, seed: int, cot: bool = False,
                cot_clamp: Sequence[float] = (0.4, 0.6), few_shot: bool = True, max_new_tokens: int = 128,
                batch_size: int = 8, progress: bool = True, principles=None,
                exemplar_principles: str = "query", self_consistency: int = 1,
                cot_temperature: float = 1.0, preamble: str = "base") -> list[Judgement]:
    """Soft labels for pairs: for each pair draw ``n_principles`` comparison principles (seeded by the
    pair's key), show the pair in both orders under each, read P(A) vs P(B) from one prefill per prompt
    (after a generated rationale when ``cot``), and average: orders cancel position bias, principles ensemble.
    Few-shot exemplars are asked under the query's principle (``exemplar_principles="query"``: every comparison
    shares the exemplar block, which is computed once) or under principles drawn for each pair independently of
    the query's (``"independent"``, as CAI did). With ``cot``, ``self_consistency`` > 1 samples that many rationales per
    comparison at ``cot_temperature`` and averages the (clamped) probabilities read after each (RLAIF). ``preamble``
    (base | detailed) picks RLAIF's prompt variant where the constitution's templates offer both.

    A function labeler (``cai.engines.FunctionLabeler``) is asked each pair in both orders instead, with no principles
    or prompts (``function_judgements``).
    """
    if isinstance(model, FunctionLabeler):
        return function_judgements(model, pairs)
    from cai.constitution import comparison_messages, sample_principles
    from cai.generation import derive_seed, generate, render_chat

    pool = principles if principles is not None else constitution.comparison
    kind = "cot" if cot else "comparison"
    if exemplar_principles not in ("query", "independent"):
        raise ValueError(f"exemplar_principles must be query or independent, got {exemplar_principles!r}")
    drawn = [sample_principles(pool, n_principles, seed, pair.key) for pair in pairs]
    n_exemplars = len(constitution.few_shot_comparison)
    prompts, prefixes = [], []  # one per (pair, principle, order), in that nesting order
    for pair, chosen_principles in zip(pairs, drawn):
        exemplars = (sample_principles(pool, n_exemplars, seed, f"{pair.key}:exemplars")
                     if few_shot and exemplar_principles == "independent" else None)
        for principle in chosen_principles:
            for first, second in ((pair.response_a, pair.response_b), (pair.response_b, pair.response_a)):
                messages, prefix = comparison_messages(constitution, pair.conversation, first, second, principle, kind, few_shot,
                                                       exemplars, preamble)
                prompts.append(messages)
                prefixes.append(prefix)
    texts = [render_chat(tok, m, p) for m, p in zip(prompts, prefixes)]
    samples = self_consistency if cot else 1  # texts per prompt: one, or one per sampled rationale
    rationales: list[str] = []
    if cot:
        # greedy for one rationale; self-consistency samples several (each prompt's consecutive)
        outs = generate(model, tok, [m for m in prompts for _ in range(samples)],
                        assistant_prefixes=[p for p in prefixes for _ in range(samples)], max_new_tokens=max_new_tokens,
                        temperature=0.0 if samples == 1 else cot_temperature,
                        seed=derive_seed(seed, "cot", pairs[0].key if pairs else ""),  # each call (shard) its own stream
                        batch_size=batch_size, progress=progress, desc="rationales")
        rationales = [o.text for o in outs]
        texts = [f"{t} {r}\n{constitution.answer_cues['cot_answer']}"
                 for t, r in zip([t for t in texts for _ in range(samples)], rationales)]
    contexts, candidates = [], []
    for text in texts:
        context, ids = option_tokens(tok, text, OPTION_LABELS)
        contexts.append(context)
        candidates.append(ids)
    per_pair = 2 * n_principles * samples  # prompts of one pair share the conversation: its prefix is run once
    groups = [k // per_pair for k in range(len(contexts))]
    logprobs = shared_prefix_logprobs(model, contexts, candidates, groups, tok.pad_token_id)
    p_each = [two_way_probability(a, b) for a, b in logprobs]
    if cot:
        p_each = [clamp(p, cot_clamp[0], cot_clamp[1]) for p in p_each]
    p_first = [sum(p_each[i:i + samples]) / samples for i in range(0, len(p_each), samples)]  # one per prompt

    judgements, k = [], 0
    for chosen_principles in drawn:  # one entry per pair
        ab, ba, why = [], [], []
        for _ in chosen_principles:
            ab.append(p_first[k])            # a shown first: P(a better) = P(A)
            ba.append(1.0 - p_first[k + 1])  # a shown second: P(a better) = P(B)
            why += rationales[k * samples:(k + 2) * samples]
            k += 2
        p_a = sum(swap_average(x, y) for x, y in zip(ab, ba)) / len(ab)
        judgements.append(Judgement(p_a, ab, ba, [p.id for p in chosen_principles], why))
    return judgements


def function_judgements(labeler: FunctionLabeler, pairs: Sequence[Pair]) -> list[Judgement]:
    """A function labeler's verdicts, shaped as a model's: each pair asked in both orders (a function with a position
    bias has it cancelled, as a model's is), ``p_a`` their average; no principles, no rationale."""
    judgements = []
    for pair in pairs:
        ab = labeler.prefer(pair.conversation, pair.response_a, pair.response_b, where=f"pair {pair.key}")
        ba = 1.0 - labeler.prefer(pair.conversation, pair.response_b, pair.response_a, where=f"pair {pair.key}")
        judgements.append(Judgement(swap_average(ab, ba), [ab], [ba], []))
    return judgements


# ---------------------------------------------------------------------------------------------
# Direct RLAIF: the labeler rates one response 1..10
# ---------------------------------------------------------------------------------------------

SCORES = tuple(str(k) for k in range(1, 11))


def score_logprobs(model, tok, texts: Sequence[str]) -> list[list[float]]:
    """log P(score) for the scores "1".."10" written right after each text.

    Scores whose first token is unique are read from one prefill. Tokenizers that split digits (SmolLM2)
    make "10" = "1" + "0": then log P("10") = log P("1") + log P("0" | "1") and log P("1") is "1" *not*
    followed by another digit, log P("1") + log(1 − P(digit | "1")) — read from the context plus "1", which
    shares the context's KV cache (``shared_prefix_logprobs``: the text is run once, and the rating instruction
    that opens every text once per call). Multi-token scores longer than two tokens are refused.
    """
    plans, contexts, candidates, groups = [], [], [], []
    for text in texts:
        encoded = [tok(text + s, add_special_tokens=False)["input_ids"] for s in SCORES]
        n = _common_prefix_length(encoded)
        context, firsts = encoded[0][:n], [e[n] for e in encoded]
        rests = [e[n + 1:] for e in encoded]
        if any(len(r) > 1 for r in rests):
            raise LabelerError(f"a score is more than two tokens after {text[-30:]!r}; cannot read it from log-probs")
        extended = sorted({f for f, r in zip(firsts, rests) if r})  # first tokens that some score continues
        digits = sorted(set(firsts) | {r[0] for r in rests if r})
        plans.append((len(contexts), firsts, rests, extended, digits))
        for sequence in [context] + [context + [f] for f in extended]:
            contexts.append(sequence)
            candidates.append(digits)
            groups.append(len(plans) - 1)
    logprobs = shared_prefix_logprobs(model, contexts, candidates, groups, tok.pad_token_id)
    results = []
    for start, firsts, rests, extended, digits in plans:
        first_lp = dict(zip(digits, logprobs[start]))
        after = {f: dict(zip(digits, logprobs[start + 1 + j])) for j, f in enumerate(extended)}
        row = []
        for first, rest in zip(firsts, rests):
            lp = first_lp[first]
            if rest:
                lp += after[first][rest[0]]
            elif first in after:  # the score ends here: the next token is not one of the digits
                p_digit = sum(math.exp(v) for v in after[first].values())
                lp += math.log(max(1.0 - p_digit, 1e-12))
            row.append(lp)
        results.append(row)
    return results


def direct_scores(model, tok, constitution, items: Sequence[tuple[list[dict], str]], *, kind: str = "score") -> list[float]:
    """The expected 1..10 rating in [-1, 1] of each ``(conversation, response)`` under one of the constitution's rating
    templates (a fixed instruction, so the same reply always gets the same rating): ``score`` (direct RLAIF's reward,
    evaluate's harmlessness rating) or ``evasive`` (evaluate's evasiveness rating)."""
    from cai.constitution import score_messages
    from cai.generation import render_chat

    texts = []
    for conversation, response in items:
        messages, prefix = score_messages(constitution, conversation, response, kind)
        texts.append(render_chat(tok, messages, prefix))
    return [normalised_score(lp) for lp in score_logprobs(model, tok, texts)]


# ---------------------------------------------------------------------------------------------
# Agreement with human-labeled pairs (label_alignment, evaluate)
# ---------------------------------------------------------------------------------------------

def read_human_pairs(path: Path, limit: int | None = None) -> tuple[list[Pair], dict]:
    """Pairs with ``response_a`` = the human's choice, and counts of skipped rows by reason. Rows are hh-rlhf
    transcripts (``chosen``/``rejected``), ai_feedback's chats (``prompt``/``chosen``/``rejected`` lists), or plain
    text (``prompt``, ``chosen`` and ``rejected`` strings, as cai's built-in helpfulness pairs)."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    pairs, skipped = [], defaultdict(int)
    for n, row in jsonl_rows(path):
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DataError(f"{path}:{n}: needs 'chosen' and 'rejected' (hh-rlhf transcripts or ai_feedback rows)")
        if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
            raise DataError(f"{path}:{n}: 'chosen' and 'rejected' must both be transcripts or both be chats")
        if isinstance(row["chosen"], str) and isinstance(row.get("prompt"), str) and not _is_transcript(row):
            # plain text: a prompt and two replies
            context, chosen, rejected = [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"]
            reason = ("empty_response" if not chosen.strip() or not rejected.strip() else
                      "identical_responses" if chosen.strip() == rejected.strip() else None)
        elif isinstance(row["chosen"], str):
            context, chosen, rejected, reason = _split_transcripts(row["chosen"], row["rejected"])
        else:
            context, chosen, rejected, reason = _split_conversational(row, path, n)
        if reason:
            skipped[reason] += 1
            continue
        pairs.append(Pair(f"{path.name}:{n}", context, chosen, rejected))
        if limit and len(pairs) >= limit:
            break
    return pairs, dict(skipped)


def _is_transcript(row: dict) -> bool:
    """hh-rlhf style: a turn marker in the prompt or the replies (a ``prompt`` column beside full transcripts)."""
    return any("\n\nHuman:" in str(row.get(k, "")) for k in ("prompt", "chosen", "rejected"))


def _split_transcripts(chosen: str, rejected: str):
    a, b = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if not a or not b or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        return None, None, None, "no_assistant_turn"
    if a[:-1] != b[:-1]:
        return None, None, None, "different_contexts"
    if not a[:-1] or a[-2]["role"] != "user":
        return None, None, None, "no_human_turn"
    if a[-1]["content"].strip() == b[-1]["content"].strip():
        return None, None, None, "identical_responses"
    return a[:-1], a[-1]["content"], b[-1]["content"], None


def _split_conversational(row: dict, path: Path, n: int):
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if not isinstance(prompt, list) or not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"{path}:{n}: conversational rows need list-valued 'prompt', 'chosen' and 'rejected'")
    if not chosen or not rejected or chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        return None, None, None, "no_assistant_turn"
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return None, None, None, "identical_responses"
    return prompt, chosen[-1]["content"], rejected[-1]["content"], None


def alignment_metrics(judgements) -> dict:
    """Agreement and bias figures from judgements whose response_a is the human's choice."""
    def agree(p: float) -> float:
        return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0

    def summarise(js) -> dict:
        singles = [(ab, ba) for j in js for ab, ba in zip(j.p_order_ab, j.p_order_ba)]
        first_wins = [ab > 0.5 for ab, _ in singles] + [ba < 0.5 for _, ba in singles]  # (A) won in each order
        return {
            "alignment": _mean([agree(j.p_a) for j in js]),
            "mean_confidence": _mean([max(j.p_a, 1 - j.p_a) for j in js]),
            "position_bias_rate": _mean(first_wins),
            # RLAIF's position-bias figure: the same position (A or B) wins in both orders, so the verdict follows the
            # position, not the responses
            "same_position_preferred": _mean([(ab > 0.5) != (ba > 0.5) for ab, ba in singles]),
            "single_order_alignment": _mean([agree(ab) for ab, _ in singles]),
            "judgements": len(singles),
        }

    metrics = summarise(judgements)
    by_principle = defaultdict(list)
    for j in judgements:
        for pid, ab, ba in zip(j.principle_ids, j.p_order_ab, j.p_order_ba):
            by_principle[pid].append(type(j)((ab + ba) / 2, [ab], [ba], [pid]))
    metrics["per_principle"] = {pid: summarise(js) for pid, js in sorted(by_principle.items())}
    return metrics


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else float("nan")
