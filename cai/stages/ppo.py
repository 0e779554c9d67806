"""RL-CAI: PPO with the preference model as reward (or direct RLAIF), policy and value in DeepSpeed engines; or a
critic-free method (``ppo.algorithm``: rloo, grpo, dr_grpo) that samples k responses per prompt and measures each
against its siblings instead of a value model; or RLAIF's REINFORCE (``reinforce``), a value model's V(x) of the prompt
as the baseline of each whole response; or online DPO from AI feedback (``online_dpo``, Guo et al. 2024): two responses
per prompt, the reward labels the pair (with ``ppo.reward=pairwise`` the labeler judges it as ai_feedback does), and the
DPO loss of the DPO stage (``ppo.dpo_loss``) trains the policy on it against the frozen reference, ``kl_coef`` its beta.

    python -m cai.stages.ppo run_dir=R [ppo.kl_coef=0.05] [ppo.reward=direct_rlaif] [ppo.algorithm=rloo]
    torchrun --nproc_per_node 2 -m cai.stages.ppo run_dir=R deepspeed=zero3

The stage keeps the name of the papers' method (and its run folder ``ppo/``) whichever algorithm runs; the
manifest records the algorithm.

Models (roles: ``cai.roles``): the policy and a frozen reference both start from ``${run_dir}/sl_train/model``
(else the ``policy`` role); the reward is the PM of ``${run_dir}/pm_finetune/model`` (frozen, on the
``pm_backbone`` role's device and dtype; its stored reward shift applied) and the value model starts from that
PM. With ``ppo.reward=direct_rlaif`` the ``labeler`` role rates each
response 1..10 with the constitution's rating template (``cai.feedback.direct_scores``, mapped to [-1, 1]),
no PM is used and the value model starts from the policy with a fresh head; ``ppo.reward=pairwise`` has the labeler
compare the k responses to a prompt two by two (each one's mean soft win rate against its siblings); ``ppo.reward=custom`` calls the
function ``ppo.reward_fn`` names (``cai.rewards`` has all four). Dropout is off everywhere.
The PM must share the policy's tokenizer (the value model reads policy tokens): cai refuses otherwise.

One step — ``sample`` (1–2), the reward (3), ``make_experience`` (3–4), ``update`` (5); the maths is in ``cai.rl``, and
what differs between the algorithms is ``cai.rl.Algorithm``'s (``rl.algorithm`` reads it from the settings):
1. sample ``batch_size`` prompts per rank from the pool (a seeded order, cycled; its position is the step);
2. generate k = ``samples_per_prompt`` responses each (temperature T, top_p 1; under ZeRO-3 the policy is gathered
   once for the whole rollout), cut after the first EOS; with ``ppo.rollout_engine=vllm`` a vLLM engine in this
   process samples them, given the policy's current weights first (``cai.engines.VLLMEngine.load_weights``);
3. the reward: PM at the last real token (minus ``missing_eos_penalty``, or replaced by ``missing_eos_score``, when
   there is no EOS); then the experience: log-probs of the policy and the reference with logits / T, values of the
   value model (``Algorithm.critic``: ppo per token, reinforce per prompt);
4. the advantages (``Algorithm.advantages``): ppo: rewards -beta * KL per token plus the score at the last token; GAE
   (gamma, lambda); advantages whitened.
   rloo, grpo, dr_grpo: each response's reward (its score, less beta * its summed KL when ``kl_in=reward``) against
   the other responses to its prompt (``rl.group_advantages``), the same advantage at every token; reinforce: the
   reward (1 - beta) * score - beta * summed KL less the value model's V(x) (``rl.reinforce_advantages``), likewise;
   online_dpo: no advantages but each response's label, its probability of being the better of its pair
   (``rl.pair_labels``: the pairwise labeler's p, or sigma of the score difference for a scalar reward);
5. ``ppo_epochs`` passes over ``num_minibatches`` minibatches: clipped policy loss (``Algorithm.policy_losses``: a
   ratio per token, aggregated over tokens as the algorithm does, ``rl.aggregate``; rloo with ``rloo_ratio=sequence``
   one ratio per response), plus beta * k3 KL when ``kl_in=loss``, plus the clipped value loss (``Algorithm.critic_loss``;
   ppo: per token against the GAE returns; reinforce: V(x) against the reward),
   padding masked; online_dpo: the DPO loss instead (``rl.online_dpo_loss``; log-probs at T = 1, as the DPO stage);
   beta then follows the adaptive controller when ``target_kl`` is set.

Writes ``${run_dir}/ppo/``: ``metrics.jsonl`` (per step: score, reward, kl, kl_coef, response_length (tokens),
response_chars (characters), eos_rate, policy_loss, clip_frac, entropy, approx_kl, samples_per_s; ppo, reinforce:
value_loss, value_clip_frac; k > 1: group_score_std, the mean spread of the scores of one prompt's responses;
kl_in=loss: kl_loss; online_dpo: margin, accuracy and pairs_used instead of the clip figures, and label_decisiveness, the
mean |p - 1/2| of the pairs' labels (how decided the labeler is); reward=pairwise: comparisons_per_s (pairs judged, each
in both orders, a second of labeling); and the step's seconds split into rollout_s (generation), score_s (the reward and
make_experience: log-probs, values, advantages), within it label_s (the reward alone), and update_s),
``samples.jsonl``, ``checkpoints/`` (policy, value, optimizers, KL controller, RNG, step), ``model/``
(the final policy, ``save_pretrained``) and ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai import rewards, rl, roles, training
from cai.data import load_prompts
from cai.engines import device_of
from cai.errors import StageError, StageInputError
from cai.generation import derive_seed, generate, render_chat
from cai.lineage import input_fingerprint
from cai.metrics import MetricsWriter, read_metrics
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, check_generation, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "ppo"
UPSTREAM = ("sl_train", "pm_finetune")
HASH_KEYS = ("seed", "policy", "sl_start", "labeler", "pm_backbone", "constitution", "data", "generation", "deepspeed", STAGE)
MULTI_RANK = True
SHARDED = False
REWARDS = ("pm", "direct_rlaif", "pairwise", "custom")


def run(cfg: DictConfig, stage: StageRun) -> Path:
    from cai import distributed

    s = cfg[STAGE]
    rank, world, main_rank = stage.rank, stage.world, stage.main

    # Step 1: check settings and find the inputs before touching the run directory.
    algo = _check_settings(s)
    check_generation(cfg.generation, temperature=s.temperature)
    policy_cfg, policy_fingerprint = _policy_source(cfg, s, stage)
    reward = _reward(cfg, s, stage)
    win_rates = s.reward == "pairwise"  # its scores are each response's win rate against its siblings (rl.pair_labels)
    items = load_prompts(cfg.data.red_team_path, cfg.data.red_team_column, "red_team", s.num_prompts, cfg.seed,
                         cfg.data.hh_context, key=f"{STAGE}.num_prompts")
    items += load_prompts(cfg.data.helpful_path, cfg.data.helpful_column, "helpful", s.num_helpful, cfg.seed,
                          cfg.data.hh_context, key=f"{STAGE}.num_helpful")
    out = stage.out
    if stage.done("model", policy_fingerprint=policy_fingerprint, reward_fingerprint=reward.fingerprint):
        return out / "model"

    # Step 2: the models. Policy and value (ppo) train in engines; the reference and the reward's models are frozen.
    from cai.models import load_policy, load_preference_model

    torch.manual_seed(cfg.seed)
    policy, tok = load_policy(policy_cfg)
    reference, _ = load_policy(policy_cfg)
    reference.requires_grad_(False)
    # rollout_engine=vllm: vLLM samples the responses in this process (started before a vLLM labeler, which then runs
    # in its own; on several ranks, each rank's own engine samples its prompts, and a vLLM labeler is refused), given the
    # policy's weights before each rollout (log-probs stay the training policy's: make_experience())
    rollout = None
    if s.rollout_engine == "vllm":
        from cai.engines import VLLMEngine

        rollout = VLLMEngine(policy_cfg, tok, key=f"{STAGE}.rollout_engine", in_process=True)
    reward_models = reward.load(tok)
    value_model = load_preference_model(reward.value_start or policy_cfg)[0] if algo.critic else None
    # prompts as the policy sees them; too long ones are left out (counted)
    queries = [tok(render_chat(tok, it.messages()), add_special_tokens=False)["input_ids"] for it in items]
    pool = [i for i, q in enumerate(queries) if len(q) <= s.max_prompt_length]
    if not pool:
        raise StageInputError(f"every prompt is longer than {STAGE}.max_prompt_length={s.max_prompt_length} tokens")
    context = getattr(policy.config, "max_position_embeddings", None)
    if context and s.max_prompt_length + s.max_new_tokens > context:
        raise StageInputError(f"{STAGE}.max_prompt_length + {STAGE}.max_new_tokens = {s.max_prompt_length + s.max_new_tokens} "
                              f"exceeds the policy's context of {context} tokens")

    # Step 3: engines. One optimizer step per minibatch; the LR decays linearly over all of them.
    updates = s.steps * s.ppo_epochs * s.num_minibatches
    micro = s.batch_size * algo.k // s.num_minibatches
    optim = {"micro_batch_size": micro, "grad_accum": 1, "warmup_ratio": 0.0, "weight_decay": 0.0, "grad_clip": s.grad_clip}
    policy_engine, policy_sched = training.build_engine(policy, cfg, OmegaConf.create({**optim, "lr": s.lr}), updates)
    engines = {"policy": policy_engine}
    value_engine = None
    if algo.critic:
        value_engine, _ = training.build_engine(value_model, cfg, OmegaConf.create({**optim, "lr": s.value_lr}), updates)
        engines["value"] = value_engine
    kl_ctl = rl.AdaptiveKL(s.kl_coef, s.target_kl, s.kl_horizon, ceiling=algo.kl_ceiling)

    # Step 4: resume from the newest checkpoint of the same config and inputs, or start over.
    checkpoints = out / "checkpoints"
    loaded = {"policy": policy, "reference": reference, **({"value": value_model} if algo.critic else {}), **reward_models}
    # the models behind the roles: the policy's start, the PM (reward=pm) or the labeler (direct_rlaif, pairwise)
    models = {"policy": policy_cfg, "sl_start": None, "pm_backbone": reward.value_start if s.reward == "pm" else None,
              "labeler": getattr(reward, "labeler_cfg", None)}
    stage.started(counts={"prompts": len(pool), "prompts_too_long": len(items) - len(pool), "steps": s.steps,
                          "samples_per_prompt": algo.k},
                  constitution_hash=reward.constitution_hash, policy=policy_cfg["path"], reward=s.reward, algorithm=algo.name,
                  models=models, devices={name: device_of(m) for name, m in loaded.items()})
    state = training.resume_or_restart(engines, out, stage.resume, stage=STAGE, total_steps=s.steps, rank=rank,
                                       logs=("metrics.jsonl", "samples.jsonl"))
    first_step = state["step"] if state else 0
    if state:
        kl_ctl.load(state["kl"])
    metrics = MetricsWriter(out, enabled=main_rank, logger=cfg.logger, run_name=STAGE)
    samples = MetricsWriter(out, name="samples.jsonl", enabled=main_rank)  # text: not mirrored

    # Step 5: the RL loop: a rollout (no gradient), then the updates on it.
    device = policy_engine.device
    bar = tqdm(total=s.steps, initial=first_step, desc=STAGE, unit="step", disable=not (cfg.progress and main_rank))
    warned = False
    for step in range(first_step, s.steps):
        t0 = _clock(device)
        prompts = _step_prompts(pool, step, world * s.batch_size, cfg.seed)[rank * s.batch_size:(rank + 1) * s.batch_size]
        rows = [i for i in prompts for _ in range(algo.k)]  # a prompt's k responses side by side: one group
        conversations = [items[i].messages() for i in rows]
        completions, batch = sample(policy_engine, rollout, tok, conversations, [queries[i] for i in rows], s=s, cfg=cfg,
                                    step=step, rank=rank, group=algo.k)
        t_rollout = _clock(device)
        raw = reward(batch, conversations, completions, [f"{items[i].id}:{step}" for i in rows]).to(device).float()
        t_labeled = _clock(device)
        if distributed.sum_over_ranks(int(not torch.isfinite(raw).all())) > 0:
            raise StageError(f"a non-finite reward (score) at step {step + 1}; stopping before any update on it. "
                             f"Last good checkpoint: {training.latest_tag(checkpoints)} in {checkpoints}")
        beta = kl_ctl.value
        ro = make_experience(policy_engine, reference, value_engine, batch, raw, s=s, algo=algo, beta=beta,
                             win_rates=win_rates)
        t_experience = _clock(device)
        lr = policy_sched.get_last_lr()[0]
        stats = update(policy_engine, value_engine, ro, s=s, algo=algo, beta=beta, seed=cfg.seed, step=step, rank=rank,
                       checkpoints=checkpoints)
        t_updated = _clock(device)

        # metrics (means over ranks), KL controller, samples, checkpoint
        seq_kl = ro.kl.sum(dim=1)
        row = {"step": step + 1, "score": raw.mean().item(), "reward": algo.reward(ro.scores, seq_kl, beta, ro.returns).mean().item(),
               "kl": seq_kl.mean().item(), "kl_coef": beta, "response_length": batch.mask.sum(dim=1).float().mean().item(),
               "response_chars": sum(len(c.text.strip()) for c in completions) / len(completions),
               "eos_rate": ro.has_eos.float().mean().item(), "entropy": ro.entropy, **stats}
        if algo.k > 1:
            row["group_score_std"] = rl.group_spread(ro.scores, algo.k).item()  # after the missing-EOS treatment
        if algo.preference:  # the reward's own labels, before the missing-EOS treatment
            row["label_decisiveness"] = (rl.pair_labels(raw, win_rates)[0::2] - 0.5).abs().mean().item()
        row = {k: (v if k in ("step", "kl_coef") else round(distributed.mean_over_ranks(v), 6)) for k, v in row.items()}
        n_samples = world * s.batch_size * algo.k
        kl_ctl.update(row["kl"], n_samples)
        seconds = time.perf_counter() - t0
        row.update(lr=lr, samples_per_s=round(n_samples / max(seconds, 1e-9), 3), seconds=round(seconds, 3),
                   rollout_s=round(t_rollout - t0, 3), score_s=round(t_experience - t_rollout, 3),
                   label_s=round(t_labeled - t_rollout, 3), update_s=round(t_updated - t_experience, 3))
        if win_rates:  # the labeler judged each pair of a group, in both orders: one comparison each
            judged = world * s.batch_size * len(rewards.sibling_pairs(algo.k))
            row["comparisons_per_s"] = round(judged / max(t_labeled - t_rollout, 1e-9), 3)
        if row["eos_rate"] == 0 and main_rank and not warned:
            warned = True
            tqdm.write(f"cai {STAGE}: step {step + 1}: no response ended within {STAGE}.max_new_tokens={s.max_new_tokens}; "
                       + (f"each scored missing_eos_score={s.missing_eos_score}" if s.missing_eos_score is not None else
                          f"each lost missing_eos_penalty={s.missing_eos_penalty}") + " (eos_rate in metrics.jsonl tracks this)")
        metrics.log(**row)
        if s.log_samples_every and (step + 1) % s.log_samples_every == 0:
            for i in range(0, min(2 * algo.k, len(rows)), algo.k):  # the first response to each of two prompts
                samples.log(step=step + 1, prompt=items[rows[i]].prompt, response=completions[i].text,
                            score=round(raw[i].item(), 4), eos=bool(ro.has_eos[i]))
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}", refresh=False)  # shown with this step's update
        bar.update(1)
        if (step + 1) % s.save_every == 0 and step + 1 < s.steps:
            distributed.save_checkpoint(engines, checkpoints, step + 1,
                                        {"step": step + 1, "rng": distributed.rng_state(), "kl": kl_ctl.state()})
    bar.close()
    metrics.close()

    # Step 6: the final policy, then the manifest (last).
    distributed.save_final_model(policy_engine, tok, out / "model")
    if main_rank:
        history = [m for m in read_metrics(out) if "score" in m]
        head, tail = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4):]
        means = {f"{k}_{where}": round(sum(m[k] for m in part) / len(part), 6)
                 for k in ("score", "kl") for where, part in (("first", head), ("last", tail))}
        headline = (f"mean score {means['score_first']:+.3f} -> {means['score_last']:+.3f}, KL {means['kl_last']:.3f} "
                    f"(first/last quarter)")
        stage.complete(stage_summary(f"{s.steps} steps", headline, **means))
    return out / "model"


@dataclass
class Rollout:
    """One step's samples with everything the update needs, computed without gradient before it (``make_experience``).
    B responses (a prompt's k responses consecutive), R response positions; response tensors are right-padded and
    masked by ``batch.mask``."""
    batch: "_Batch"              # prompt (B, Q) and response (B, R) tokens with their masks
    has_eos: torch.Tensor        # (B,) bool: the response ended with EOS
    scores: torch.Tensor         # (B,) the reward's score; where there was no EOS, less missing_eos_penalty (or
                                 # replaced by missing_eos_score)
    logprobs: torch.Tensor       # (B, R) log π_old(a_t | s_t) at temperature T (online_dpo: at 1, ``Algorithm.tempered``)
    ref_logprobs: torch.Tensor   # (B, R) log π_ref(a_t | s_t), likewise
    kl: torch.Tensor             # (B, R) KL estimate to the reference, log π_old - log π_ref (k1) or k3; 0 on padding
    advantages: torch.Tensor     # (B, R) ppo: GAE advantages, whitened over the batch's real tokens; critic-free: each
                                 # response's group advantage at every real token; reinforce: R - V(x), likewise;
                                 # online_dpo: each response's label (rl.pair_labels), likewise
    entropy: float               # mean per-token entropy of π_old over real tokens
    values: torch.Tensor | None = None   # (B, R) V_old(s_t) of the value model (ppo); reinforce: (B,) V_old(x)
    returns: torch.Tensor | None = None  # (B, R) GAE returns, the value model's targets (ppo); reinforce: (B,) rewards


def sample(policy_engine, rollout, tok, conversations: list[list[dict]], queries: list[list[int]], *, s, cfg, step: int,
           rank: int, group: int):
    """One response per conversation from the policy (temperature T, top_p 1; under ZeRO-3 the weights are gathered
    once for the whole rollout), cut after the first EOS; each run of ``group`` conversations is one prompt's. With a
    vLLM ``rollout`` engine, the policy's current weights are loaded into it (gathered once under ZeRO-3) and it
    samples, woken before and put to sleep after with ``vllm.sleep``. Returns (completions, ``_Batch`` on the policy's
    device)."""
    device = policy_engine.device
    zero3 = policy_engine.zero_optimization_stage() == 3
    with _gathered(policy_engine.module) if zero3 else contextlib.nullcontext():
        if rollout is not None:
            rollout.wake_up()  # (policy.vllm.sleep: it slept through the last update)
            rollout.load_weights(policy_engine.module)
        completions = generate(rollout or policy_engine.module, tok, conversations, max_new_tokens=s.max_new_tokens,
                               temperature=s.temperature, top_p=1.0, seed=derive_seed(cfg.seed, STAGE, step, rank),
                               batch_size=cfg.generation.batch_size, progress=False)
        if rollout is not None:
            rollout.sleep()  # (policy.vllm.sleep: its GPU memory is the update's until the next rollout)
    query, query_mask = training.pad_batch(queries, tok.pad_token_id, side="left")
    sampled, _ = training.pad_batch([c.token_ids for c in completions], tok.pad_token_id)
    response, mask, has_eos = rl.truncate_after_eos(sampled, tok.eos_token_id, tok.pad_token_id)
    return completions, _Batch(query.to(device), query_mask.to(device), response.to(device), mask.to(device), has_eos.to(device),
                               group)


@torch.no_grad()
def make_experience(policy_engine, reference, value_engine, batch: "_Batch", raw: torch.Tensor, *, s, algo: rl.Algorithm,
                    beta: float, win_rates: bool = False) -> Rollout:
    """What the update needs to know of the sampled ``batch`` and its raw scores (B,), computed without gradient: the
    scores after the missing-EOS treatment, log-probs of the policy and the reference (logits / T; online_dpo: T = 1),
    the per-token KL, the value model's values (``algo.critic``) and the advantages with the value model's targets
    (``algo.advantages``: ppo's GAE, the critic-free methods' group baselines, reinforce's V(x), online_dpo's pair labels;
    ``win_rates``: the scores are the pairwise labeler's)."""
    scores = rl.apply_missing_eos_penalty(raw, batch.has_eos, s.missing_eos_penalty, s.missing_eos_score)
    temperature = _loss_temperature(s, algo)
    logits = _response_logits(policy_engine.module, batch)
    logprobs = rl.logprobs_from_logits(logits, batch.response, temperature)
    entropy = rl.masked_mean(rl.entropy_from_logits(logits, temperature), batch.mask).item()
    del logits
    ref_logprobs = rl.logprobs_from_logits(_response_logits(reference, batch), batch.response, temperature)
    kl = rl.kl_per_token(logprobs, ref_logprobs, s.kl_estimator) * batch.mask
    values = _values(value_engine.module, batch, algo.critic) if algo.critic else None
    advantages, returns = algo.advantages(scores, kl, batch.mask, beta, values, gamma=s.gamma, lam=s.lam,
                                          whiten_rewards=s.whiten_rewards, win_rates=win_rates)
    return Rollout(batch=batch, has_eos=batch.has_eos, scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, kl=kl,
                   advantages=advantages, entropy=entropy, values=values, returns=returns)


def update(policy_engine, value_engine, ro: Rollout, *, s, algo: rl.Algorithm, beta: float, seed: int, step: int, rank: int,
           checkpoints: Path) -> dict:
    """``ppo_epochs`` passes over ``num_minibatches`` shuffled minibatches of the rollout: the clipped policy loss (plus
    beta * the k3 KL to the reference when ``kl_in=loss``; online_dpo: the DPO loss; ``algo.policy_losses``) and, with a
    value model (``algo.critic``: ppo, reinforce), its clipped loss (``algo.critic_loss``); one optimizer step each per
    minibatch. Returns the mean of each loss statistic."""
    from cai import distributed

    k = ro.batch.group
    micro = ro.batch.response.shape[0] // s.num_minibatches  # whole groups: batch_size divides by num_minibatches
    stats: dict[str, list[float]] = {}
    for epoch in range(s.ppo_epochs):
        groups = list(range(ro.batch.response.shape[0] // k))
        random.Random(derive_seed(seed, STAGE, step, rank, epoch)).shuffle(groups)
        order = [g * k + j for g in groups for j in range(k)]  # a prompt's responses stay together (one prompt pass)
        for m in range(s.num_minibatches):
            idx = torch.tensor(order[m * micro:(m + 1) * micro], device=policy_engine.device)
            mb = ro.batch.select(idx)
            logp = rl.logprobs_from_logits(_response_logits(policy_engine, mb), mb.response, _loss_temperature(s, algo))
            losses, figures = algo.policy_losses(logp, ro.logprobs[idx], ro.ref_logprobs[idx], ro.advantages[idx], mb.mask,
                                                 s.clip_range, s.max_new_tokens, beta=beta)
            if algo.critic:
                values = _values(value_engine.module, mb, algo.critic)
                losses["value_loss"], v_clip = algo.critic_loss(values, ro.values[idx], ro.returns[idx], mb.mask,
                                                                s.clip_range_value)
            if distributed.sum_over_ranks(int(not all(torch.isfinite(x) for x in losses.values()))) > 0:
                raise StageError(f"a non-finite loss at step {step + 1}; stopping. Last good checkpoint: "
                                 f"{training.latest_tag(checkpoints)} in {checkpoints}")
            p_loss = losses["policy_loss"]
            policy_engine.backward(p_loss + beta * losses["kl_loss"] if "kl_loss" in losses else p_loss)
            policy_engine.step()
            if algo.critic:
                value_engine.backward(losses["value_loss"])
                value_engine.step()
                losses["value_clip_frac"] = v_clip
            for key, value in {**losses, **figures}.items():
                stats.setdefault(key, []).append(value.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


class _Batch:
    """Sampled tokens: left-padded queries (B, Q) and right-padded responses (B, R) with their masks, which responses
    ended with EOS (B,), and ``group``: each run of that many consecutive rows answers one prompt (its query repeated),
    so model passes compute that prompt once (``cai.models.response_forward``)."""

    def __init__(self, query, query_mask, response, mask, has_eos, group: int = 1):
        self.query, self.query_mask, self.response, self.mask, self.has_eos = query, query_mask, response, mask, has_eos
        self.group = group

    def select(self, idx: torch.Tensor) -> "_Batch":
        """The rows ``idx``: whole groups, in order."""
        return _Batch(self.query[idx], self.query_mask[idx], self.response[idx], self.mask[idx], self.has_eos[idx], self.group)


def _response_logits(model, b: _Batch) -> torch.Tensor:
    """(B, R, V) logits predicting each response token (from the position before it)."""
    from cai.models import lm_call, response_forward

    return response_forward(lm_call(model), b.query, b.query_mask, b.response, b.mask, b.group)[:, :-1]


def _token_values(value_model, b: _Batch) -> torch.Tensor:
    """(B, R) value estimates V(s_t): the scalar head on the hidden state before each response token."""
    from cai.models import backbone_call, response_forward

    hidden = response_forward(backbone_call(value_model), b.query, b.query_mask, b.response, b.mask, b.group)
    return value_model.score(hidden[:, :-1]).squeeze(-1).float()


def _prompt_values(value_model, b: _Batch) -> torch.Tensor:
    """(B,) V(x): the scalar head at each prompt's last token (the state before the response; ``_token_values``' first
    column), the prompt run once per group."""
    from cai.models import preference_scores

    return preference_scores(value_model, b.query[::b.group], b.query_mask[::b.group]).repeat_interleave(b.group)


def _values(value_model, b: _Batch, critic: str) -> torch.Tensor:
    """The value model's estimates as ``rl.Algorithm.critic`` names them: token, (B, R) V(s_t); prompt, (B,) V(x)."""
    return _token_values(value_model, b) if critic == "token" else _prompt_values(value_model, b)


def _loss_temperature(s, algo: rl.Algorithm) -> float:
    """The temperature the losses read log-probs at (``rl.Algorithm.tempered``): the sampling one, or 1."""
    return s.temperature if algo.tempered else 1.0


def _clock(device: torch.device) -> float:
    """A wall-clock reading after the GPU has finished the work queued so far (CUDA runs asynchronously, so
    the per-phase times in metrics.jsonl would otherwise land on whichever phase waits first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _step_prompts(pool: list[int], step: int, count: int, seed: int) -> list[int]:
    """The ``count`` prompts of ``step``: positions step*count ... in a seeded order of the pool that is
    reshuffled each time it has been used up."""
    n = len(pool)
    orders: dict[int, list[int]] = {}
    picked = []
    for position in range(step * count, (step + 1) * count):
        cycle, k = divmod(position, n)
        if cycle not in orders:
            orders[cycle] = training.epoch_order(n, n, f"cai-ppo-prompts:{seed}", cycle)
        picked.append(pool[orders[cycle][k]])
    return picked


def _gathered(module):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _check_settings(s: DictConfig) -> rl.Algorithm:
    """The checked settings' algorithm (``rl.algorithm``); a bad setting is refused in one line naming its key."""
    if s.rollout_engine not in ("hf", "vllm"):
        raise StageInputError(f"{STAGE}.rollout_engine must be hf or vllm, got {s.rollout_engine!r}")
    if s.reward not in REWARDS:
        raise StageInputError(f"{STAGE}.reward must be one of {', '.join(REWARDS)}, got {s.reward!r}")
    try:  # algorithm, samples_per_prompt, kl_in, rloo_ratio and what each algorithm cannot take
        algo = rl.algorithm(s, STAGE)
    except ValueError as e:
        raise StageInputError(str(e)) from None
    if s.reward == "pairwise" and algo.k < 2:
        raise StageInputError(f"{STAGE}.reward=pairwise compares the responses to one prompt with each other: "
                              f"{STAGE}.samples_per_prompt must be >= 2 (or a critic-free {STAGE}.algorithm)")
    if s.missing_eos_score is not None and (isinstance(s.missing_eos_score, bool)
                                            or not isinstance(s.missing_eos_score, (int, float))):
        raise StageInputError(f"{STAGE}.missing_eos_score must be a number or null, got {s.missing_eos_score!r}")
    if not isinstance(s.pairwise_principles, int) or s.pairwise_principles < 1:
        raise StageInputError(f"{STAGE}.pairwise_principles must be an integer >= 1, got {s.pairwise_principles!r}")
    if s.reward_fn is not None and s.reward != "custom":
        raise StageInputError(f"{STAGE}.reward_fn is set but {STAGE}.reward={s.reward}; set {STAGE}.reward=custom to use it")
    if s.kl_coef is None or s.kl_coef < 0:
        raise StageInputError(f"{STAGE}.kl_coef (beta) must be >= 0, got {s.kl_coef}")
    if s.kl_estimator not in ("k1", "k3"):
        raise StageInputError(f"{STAGE}.kl_estimator must be k1 or k3, got {s.kl_estimator!r}")
    if s.target_kl is not None and s.target_kl <= 0:
        raise StageInputError(f"{STAGE}.target_kl must be > 0 or null, got {s.target_kl}")
    for key in ("steps", "batch_size", "num_minibatches", "ppo_epochs", "max_new_tokens", "max_prompt_length",
                "save_every", "lr", "value_lr", "kl_horizon", "temperature"):
        if s[key] is None or s[key] <= 0:
            raise StageInputError(f"{STAGE}.{key} must be > 0, got {s[key]}")
    if s.batch_size % s.num_minibatches:  # so each minibatch holds whole groups of one prompt's responses
        raise StageInputError(f"{STAGE}.batch_size={s.batch_size} must be divisible by {STAGE}.num_minibatches={s.num_minibatches}")
    if not (0 <= s.gamma <= 1 and 0 <= s.lam <= 1):
        raise StageInputError(f"{STAGE}.gamma and {STAGE}.lam must be in [0, 1], got {s.gamma}, {s.lam}")
    if s.clip_range <= 0 or s.clip_range_value <= 0 or s.missing_eos_penalty < 0 or s.num_prompts < 0 or s.num_helpful < 0:
        raise StageInputError(f"{STAGE}.clip_range, clip_range_value must be > 0; missing_eos_penalty, num_prompts, "
                              f"num_helpful >= 0")
    if s.num_prompts + s.num_helpful < 1:
        raise StageInputError(f"{STAGE}.num_prompts + {STAGE}.num_helpful must be >= 1")
    return algo


def _reward(cfg: DictConfig, s: DictConfig, stage: StageRun):
    """The reward ``ppo.reward`` names, from its checked inputs (``cai.rewards``); nothing is loaded yet. The PM loads
    on the pm_backbone role's device and dtype."""
    if s.reward == "pm":
        if not s.reward_model:
            return rewards.PreferenceModelReward(*stage.upstream_model("pm_finetune", "pm_backbone", required=True))
        pm_path = Path(s.reward_model)
        if not (pm_path / "config.json").exists():
            raise StageInputError(f"{STAGE}.reward_model={s.reward_model!r}: no checkpoint (config.json) there")
        pm_cfg = roles.spec(cfg, "pm_backbone", at=pm_path, key=f"{STAGE}.reward_model")
        return rewards.PreferenceModelReward(pm_cfg, input_fingerprint(pm_path))
    if s.reward in ("direct_rlaif", "pairwise"):
        from cai.constitution import load_constitution, resolve_constitution_dir

        constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
        if s.reward == "pairwise":
            return rewards.PairwiseLabelerReward(roles.spec(cfg, "labeler"), constitution, cfg.seed, cfg.generation.batch_size,
                                                 s.pairwise_principles)
        return rewards.DirectRLAIFReward(roles.spec(cfg, "labeler"), constitution)
    return rewards.FunctionReward(*rewards.function_from_config(s.reward_fn))


def _policy_source(cfg: DictConfig, s: DictConfig, stage: StageRun) -> tuple[dict, str]:
    """(model spec, fingerprint) of the policy RL starts from: ``ppo.policy``, else sl_train's model of this run (loaded
    with the settings of the model SL fine-tuned), else the policy role's own."""
    if s.policy:
        if not (Path(s.policy).expanduser() / "config.json").exists():
            raise StageInputError(f"{STAGE}.policy={s.policy!r}: no checkpoint (config.json) there")
        return roles.spec(cfg, "policy", at=Path(s.policy).expanduser(), key=f"{STAGE}.policy"), input_fingerprint(s.policy)
    return stage.upstream_model("sl_train", "sl_start") or stage.role_model("policy")


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
