"""Direct alignment: DPO on preference pairs — the labeler's soft AI labels, or the Hugging Face recipe's revision pairs.

    python -m cai.stages.dpo run_dir=R [dpo.loss=soft|sigmoid|ipo] [dpo.beta=0.1] [dpo.pairs=revisions|DATASET]
    torchrun --nproc_per_node 2 -m cai.stages.dpo run_dir=R deepspeed=zero3

Pairs (``dpo.pairs``):
- ``ai_feedback`` (the default): ``${run_dir}/ai_feedback/dataset``, the labeler's pairs with their soft label ``p_chosen``;
- ``revisions``: the Hugging Face Constitutional AI recipe's pairs, built from sl_generate's own red-team rows: the final
  revision chosen, the model's original answer rejected, a hard label (no labeler runs);
- a preference dataset (a ``save_to_disk`` folder, a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a hub name) in
  TRL's format: ``prompt`` (a string, or a conversation of ``{role, content}`` ending with the user's turn), ``chosen``
  and ``rejected`` (strings, or one assistant message each), optionally ``p_chosen``: the probability in [0, 1] that
  ``chosen`` is the better one (1 when absent; a pair below 0.5 is turned round).
Pairs with two identical responses carry no preference and are dropped (counted). ``eval_fraction`` of them is held out.

The policy starts from ``${run_dir}/sl_train/model`` (else the ``sl_start`` role, the policy unless set) and is trained
against a frozen reference: the same starting weights (``dpo.reference=null``), or another checkpoint of the same
tokenizer. The reference's log-probabilities of every pair are computed once, before training, in one pass (each rank its
share), and kept in ``reference_logps.pt``; the reference model is not held while training. A pair's prompt runs once
for both responses: its KV cache is shared by the chosen and the rejected reply (``cai.models.response_forward``).

Each pair is the chat template's prompt followed by each reply and EOS, the tokens the policy produces at generation time;
a reply's log-probability is the sum over its tokens and its EOS. A pair whose longer reply does not fit ``max_length``
is dropped and counted (``dropped_too_long``), never cut; a prompt too long is cut from the left (``truncated_context``).

The loss (``dpo.loss``; ``cai.rl.dpo_loss``): ``sigmoid`` (DPO, Rafailov et al. 2023), ``ipo`` (Azar et al. 2023) or
``soft``, the cross-entropy of sigma(beta h) against the pair's probability p (cDPO with its smoothing 1 - p set per
pair); ``auto`` picks ``soft`` when any pair's probability is not 1, else ``sigmoid`` (equal to soft at p = 1).

Writes ``${run_dir}/dpo/``: ``model/`` (``save_pretrained``, loads with ``AutoModelForCausalLM``), ``checkpoints/``
(resumable DeepSpeed checkpoints every ``save_every`` steps), ``reference_logps.pt``, ``eval.json`` (held-out figures
after the last epoch), ``metrics.jsonl`` (per step: loss, the implicit rewards of chosen and rejected, beta times the
policy-to-reference log-ratio, their margin, the accuracy of the margin's sign against the label, the labels' mean
confidence, the log-probs of chosen and rejected; a ``split: eval`` row per epoch), ``manifest.json``.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cai import preference, rl, roles, training
from cai.data import read_table
from cai.errors import DataError, StageInputError
from cai.files import atomic_write_bytes, atomic_write_json
from cai.lineage import input_fingerprint
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "dpo"
UPSTREAM = ("sl_generate", "sl_train", "ai_feedback")
HASH_KEYS = ("seed", "sl_start", "deepspeed", STAGE)
MULTI_RANK = True
SHARDED = False
REFERENCE_FILE = "reference_logps.pt"


def run(cfg: DictConfig, stage: StageRun) -> Path:
    from cai import distributed

    s = cfg[STAGE]

    # Step 1: check settings, read the pairs and find both models before touching the run directory.
    training.check_train_settings(STAGE, s)
    if s.beta is None or s.beta <= 0:
        raise StageInputError(f"{STAGE}.beta must be > 0, got {s.beta}")
    if s.loss not in ("auto", *rl.DPO_LOSSES):
        raise StageInputError(f"{STAGE}.loss must be auto, {', '.join(rl.DPO_LOSSES)}; got {s.loss!r}")
    if s.max_length is None or s.max_length < 2:  # room for one prompt token and one reply token
        raise StageInputError(f"{STAGE}.max_length must be >= 2, got {s.max_length}")
    comparisons, source, dropped = _comparisons(cfg, s, stage)
    loss_name = s.loss if s.loss != "auto" else "soft" if any(c.p_chosen != 1.0 for c in comparisons) else "sigmoid"
    train, held_out = preference.split_holdout(comparisons, s.eval_fraction, cfg.seed, STAGE, f"{STAGE}.eval_fraction")
    start_spec, start_fingerprint = stage.upstream_model("sl_train", "sl_start") or stage.role_model("sl_start")
    reference_spec, reference_fingerprint = _reference(cfg, s, start_spec)
    if stage.done("model", start_fingerprint=start_fingerprint, pairs_fingerprint=input_fingerprint(source),
                  reference_fingerprint=reference_fingerprint):
        return stage.out / "model"

    # Step 2: the starting policy and the tokenised pairs.
    from cai.models import load_policy

    torch.manual_seed(cfg.seed)
    model, tok = load_policy(start_spec)
    train_pairs, train_counts = encode_pairs(tok, train, s.max_length, f"{source}: {STAGE} training pairs")
    eval_pairs, eval_counts = encode_pairs(tok, held_out, s.max_length, f"{source}: {STAGE} held-out pairs")
    counts = {"pairs": len(comparisons), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              **dropped, **{k: train_counts[k] + eval_counts[k] for k in train_counts}}
    stage.started(counts=counts, fresh=(REFERENCE_FILE, "eval.json"), loss=loss_name, pairs_source=str(source))

    # Step 3: the reference's log-probs, once (kept on disk for a resume); then the reference is let go.
    t0 = time.time()
    reference = _reference_logps(stage, model if reference_spec is None else None, reference_spec,
                                 {"train": train_pairs, "eval": eval_pairs}, tok.pad_token_id, s.micro_batch_size)
    reference_s = round(time.time() - t0, 2)

    # Step 4: train, resuming from the newest checkpoint of the same config and inputs; held-out figures each epoch.
    plan = training.plan_for(STAGE, s, len(train_pairs), stage.world, cfg.seed)
    engine, scheduler = training.build_engine(model, cfg, s, plan.total_steps)

    def loss_fn(rows: list[int]):
        batch = [train_pairs[i] for i in rows]
        logps = pair_logps(engine, batch, tok.pad_token_id)
        return dpo_step(logps, reference["train"][rows], batch, s.beta, loss_name)

    def held_out(epoch: int) -> dict:
        figures = evaluate_pairs(engine.module, eval_pairs, reference["eval"], tok.pad_token_id, s.micro_batch_size,
                                 s.beta, loss_name)
        if stage.main:
            atomic_write_json(stage.out / "eval.json", {"epoch": epoch, **figures})
        return figures

    training.fit(engine, scheduler, plan, stage=STAGE, out=stage.out, save_every=s.save_every, resume=stage.resume,
                 rank=stage.rank, loss_fn=loss_fn, after_epoch=held_out, progress=cfg.progress, logger=cfg.logger)

    # Step 5: the final checkpoint, then the manifest (last).
    distributed.save_final_model(engine, tok, stage.out / "model")
    if stage.main:
        final = {k: training.final_metric(stage.out, k, split="eval") for k in ("loss", "accuracy", "margin")}
        stage.complete(stage_summary(f"{plan.total_steps} steps", f"{loss_name} loss, held-out accuracy {final['accuracy']}, "
                                     f"margin {final['margin']}", **{f"eval_{k}": v for k, v in final.items()}),
                       counts={**counts, "steps": plan.total_steps}, final_loss=training.final_metric(stage.out, "loss"),
                       eval=final, reference_s=reference_s)
    return stage.out / "model"


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DPOPair:
    prompt: list[int]    # chat-template prompt with the generation prompt (cut from the left to fit)
    chosen: list[int]    # the preferred reply's tokens and EOS
    rejected: list[int]
    p_chosen: float      # the label: P(chosen is better), in [0.5, 1]
    truncated: bool      # the prompt was cut


def encode_pairs(tok, comparisons: list[preference.Comparison], max_length: int, where: str) -> tuple[list[DPOPair], dict]:
    """Every comparison whose longer reply fits ``max_length`` with at least one prompt token, and counts for the
    manifest (``truncated_context``, ``dropped_too_long``). Refuses, naming ``where``, when none fits."""
    kept, dropped = [], 0
    for c in comparisons:
        prompt, chosen = training.encode_chat(tok, c.messages(), c.chosen)
        rejected = training.encode_chat(tok, c.messages(), c.rejected)[1]
        longest = max(len(chosen), len(rejected))
        if longest >= max_length:
            dropped += 1
            continue
        prompt, cut = training.keep_left(prompt, longest, max_length)
        kept.append(DPOPair(prompt, chosen, rejected, c.p_chosen, cut))
    if comparisons and not kept:
        raise DataError(f"{where}: every pair has a reply of max_length={max_length} tokens or more; raise {STAGE}.max_length")
    return kept, {"truncated_context": sum(p.truncated for p in kept), "dropped_too_long": dropped}


def revision_pairs(rows: list[dict]) -> tuple[list[preference.Comparison], int]:
    """The Hugging Face Constitutional AI recipe's pairs from sl_generate's rows: for each red-team row that was revised,
    its conversation with the final non-empty revision chosen and the original answer rejected (a hard label). Returns
    (pairs, rows without a usable revision: helpful rows, no revision, or a revision equal to the answer)."""
    pairs = []
    for row in rows:
        final = next((text for text in reversed(row.get("revisions") or []) if text.strip()), None)
        if final is None or final.strip() == row["initial_response"].strip():
            continue
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"][:-1])
        pairs.append(preference.Comparison(str(row["id"]), prompt, final, row["initial_response"]))
    return pairs, len(rows) - len(pairs)


def _comparisons(cfg: DictConfig, s: DictConfig, stage: StageRun) -> tuple[list[preference.Comparison], Path | str, dict]:
    """(the pairs ``dpo.pairs`` names, where they come from, the count of what was left out: pairs of identical replies,
    or for ``revisions`` the rows without a usable revision)."""
    if s.pairs == "revisions":
        path = stage.upstream("sl_generate") / "dataset"
        table = read_table(path, str(path))
        missing = {"id", "messages", "initial_response", "revisions"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: {STAGE}.pairs=revisions needs sl_generate's columns; missing {', '.join(sorted(missing))}")
        pairs, dropped = revision_pairs(table.to_list())
        if not pairs:
            raise DataError(f"{path}: no red-team row has a revision that differs from its answer ({STAGE}.pairs=revisions)")
        return pairs, path, {"unrevised_rows": dropped}
    path = stage.upstream("ai_feedback") / "dataset" if s.pairs == "ai_feedback" else s.pairs
    pairs, identical = preference.load_comparisons(str(path), "pairs", key=f"{STAGE}.pairs", builtin=Path(path), seed=cfg.seed)
    return pairs, path, {"identical_dropped": identical}


def _reference(cfg: DictConfig, s: DictConfig, start_spec: dict) -> tuple[dict | None, str | None]:
    """(the reference's model spec, its fingerprint); (None, None) when the reference is the starting weights. Another
    reference must tokenize as the policy does: the two log-probs of a reply are compared token for token."""
    if s.reference is None:
        return None, None
    from cai.models import load_tokenizer

    folder = Path(s.reference).expanduser()
    if not (folder / "config.json").exists():
        raise StageInputError(f"{STAGE}.reference={s.reference!r}: not a checkpoint folder (no config.json)")
    spec = roles.spec(cfg, "sl_start", at=folder, key=f"{STAGE}.reference")
    if load_tokenizer(spec).get_vocab() != load_tokenizer(start_spec).get_vocab():
        raise StageInputError(f"{STAGE}.reference={s.reference}: its tokenizer differs from the policy's "
                              f"({start_spec['path']}); DPO compares their log-probs token for token")
    return spec, input_fingerprint(folder)


# ---------------------------------------------------------------------------------------------
# Log-probs and the loss
# ---------------------------------------------------------------------------------------------

def pair_logps(model, pairs: list[DPOPair], pad_id: int) -> torch.Tensor:
    """(B, 2) summed log-probs of each pair's chosen and rejected reply (EOS included) under ``model`` (a causal LM or
    its DeepSpeed engine). One forward pass, one row per pair: [prompt | chosen | rejected] (``rl.packed_pair_attention``:
    each reply sees its prompt and itself), so each prompt runs once and no reply is padded to the other's length;
    logits only where a reply token is predicted. An attention that takes no custom mask (flash attention), or a
    sliding window shorter than a pair, runs each prompt once and shares its KV cache with both replies instead
    (``cai.models.response_forward``); the two give the same log-probs."""
    from cai.models import lm_call, response_forward

    module = getattr(model, "module", model)
    weight = next(module.parameters())
    window = getattr(module.config, "sliding_window", None)
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    query, query_mask = training.pad_batch([p.prompt for p in pairs], pad_id, side="left")
    if module.config._attn_implementation not in ("sdpa", "eager") or (window is not None and longest > window):
        response, mask = training.pad_batch([ids for p in pairs for ids in (p.chosen, p.rejected)], pad_id)
        query, query_mask = query.repeat_interleave(2, dim=0), query_mask.repeat_interleave(2, dim=0)
        query, query_mask, response, mask = (x.to(weight.device) for x in (query, query_mask, response, mask))
        logits = response_forward(lm_call(model), query, query_mask, response, mask, group=2)[:, :-1]  # (2B, R, V)
        return (rl.logprobs_from_logits(logits, response) * mask).sum(dim=1).view(-1, 2)  # rows chosen 0, rejected 0, ...
    chosen, chosen_mask = training.pad_batch([p.chosen for p in pairs], pad_id)
    rejected, rejected_mask = training.pad_batch([p.rejected for p in pairs], pad_id)
    allowed, positions = rl.packed_pair_attention(query_mask, chosen_mask, rejected_mask)
    bias = torch.zeros(allowed.shape, dtype=weight.dtype).masked_fill_(~allowed, torch.finfo(weight.dtype).min)[:, None]
    q, c, r = query.shape[1], chosen.shape[1], rejected.shape[1]
    # the column that predicts each reply token: the prompt's last for both first tokens, then the reply's own columns
    keep = torch.cat([torch.tensor([q - 1]), torch.arange(q, q + c - 1), torch.tensor([q - 1]), torch.arange(q + c, q + c + r - 1)])
    ids = torch.cat([query, chosen, rejected], dim=1)
    targets, mask = torch.cat([chosen, rejected], dim=1), torch.cat([chosen_mask, rejected_mask], dim=1)
    ids, bias, positions, keep, targets, mask = (x.to(weight.device) for x in (ids, bias, positions, keep, targets, mask))
    logits = lm_call(model)(ids, bias, positions, None, keep)[0]  # (B, C + R, V)
    logps = rl.logprobs_from_logits(logits, targets) * mask  # (B, C + R)
    return torch.stack([logps[:, :c].sum(dim=1), logps[:, c:].sum(dim=1)], dim=1)


def dpo_step(logps: torch.Tensor, ref_logps: torch.Tensor, pairs: list[DPOPair], beta: float, loss: str) -> tuple[torch.Tensor, dict]:
    """The mean DPO-family loss of a micro-batch and its figures. ``logps``, ``ref_logps``: (B, 2) chosen/rejected
    log-probs of the policy and the reference."""
    p = torch.tensor([pair.p_chosen for pair in pairs], device=logps.device)
    ref_logps = ref_logps.to(logps.device)
    losses, reward_chosen, reward_rejected = rl.dpo_loss(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
                                                         beta, loss, p)
    margin = reward_chosen - reward_rejected
    tokens = sum(len(x.prompt) + len(x.chosen) + len(x.rejected) for x in pairs)
    return losses.mean(), {"reward_chosen": reward_chosen.mean().item(), "reward_rejected": reward_rejected.mean().item(),
                           "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item(),
                           "confidence": p.mean().item(), "logp_chosen": logps[:, 0].mean().item(),
                           "logp_rejected": logps[:, 1].mean().item(), "tokens": tokens}


@torch.no_grad()
def evaluate_pairs(model, pairs: list[DPOPair], ref_logps: torch.Tensor, pad_id: int, batch_size: int, beta: float,
                   loss: str) -> dict:
    """Held-out figures (every rank runs all of them: under ZeRO-3 the forward passes are collective): the mean loss,
    implicit rewards, margin and accuracy over ``pairs``."""
    sums: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        value, figures = dpo_step(pair_logps(model, batch, pad_id), ref_logps[start:start + len(batch)], batch, beta, loss)
        for key, x in {"loss": value.item(), **figures}.items():
            sums[key] = sums.get(key, 0.0) + x * len(batch)
    return {key: round(x / len(pairs), 6) for key, x in sums.items() if key not in ("tokens", "confidence")} | {"pairs": len(pairs)}


def reference_logps(model, pairs: list[DPOPair], pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2) log-probs of every pair under ``model`` (no gradient), in batches of similar length (less padding),
    returned in input order."""
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected)))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out[chunk] = pair_logps(model, [pairs[i] for i in chunk], pad_id).float().cpu()
    return out


def _reference_logps(stage: StageRun, model, reference_spec: dict | None, splits: dict[str, list[DPOPair]], pad_id: int,
                     batch_size: int) -> dict[str, torch.Tensor]:
    """The reference's (N, 2) log-probs for each split: read back on a resume, else computed, each rank its share of the
    pairs (``model``: the starting weights, before training touches them; else the ``reference_spec`` model, loaded for
    this pass only), gathered, and saved by rank 0."""
    from cai import distributed

    path = stage.out / REFERENCE_FILE
    if stage.resume and path.exists():
        return torch.load(path, weights_only=True)
    if model is None:
        from cai.models import load_policy

        model = load_policy(reference_spec)[0]
    was_training = model.training
    model.eval()
    result = {}
    for name, pairs in splits.items():
        mine = list(range(stage.rank, len(pairs), stage.world))
        values = reference_logps(model, [pairs[i] for i in mine], pad_id, batch_size)
        out = torch.zeros(len(pairs), 2)
        for indices, part in distributed.gather_objects((mine, values)):
            out[indices] = part
        result[name] = out
    model.train(was_training)
    if stage.main:
        buffer = io.BytesIO()
        torch.save(result, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return result


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
