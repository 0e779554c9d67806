"""Side-by-side benchmarks: cai's PPO, RLOO, GRPO and DPO against TRL's, AI-feedback labeling, batched generation, the
pipeline.

    .venv/bin/python scripts/bench.py --quick            # about 20 minutes on a 2-core CPU
    .venv/bin/python scripts/bench.py --repeats 5 -o bench.json
    .venv/bin/python scripts/bench.py --only rl          # or ppo, online, dpo, generation, labeling, engine, served,
                                                         # precision, pipeline

Each pair alternates A and B in one run; the figures are medians over the repeats and the result is the ratio
of those medians (this machine is shared and noisy: absolute numbers are context). Results go to
``runs/bench/bench.json`` (``-o``) after every part, and a table is printed as each part ends.

- ppo: the real stage (``python -m cai.stages.ppo``, PM reward) against TRL 1.12.0's ``PPOTrainer`` (the
  last TRL with PPO; installed on first use with ``pip install --no-deps --target runs/bench/trl-1.12.0``, so
  the project's environment is untouched, and run in a child process with that folder first on its path).
  Both get the same four models from one folder (policy = reference; reward = value start = the same
  backbone with a seeded scalar head), the same prompts, batch, response length, PPO epochs, minibatches,
  temperature, KL coefficient and learning rate, fp32 on the CPU, and the same thread count; each run's
  step time is the median after its first step. First on the tiny random model of the tests, then on
  ``--model`` (the embedded SmolLM2-135M-Instruct by default). samples/s = prompts per step / step time.
- rl: the real stage with ``ppo.algorithm=rloo`` and ``grpo`` against TRL 1.16.0's ``RLOOTrainer`` and
  ``GRPOTrainer`` (installed like TRL 1.12, into ``runs/bench/trl-1.16.0``): the same policy and PM folder, prompts,
  4 prompts x k = 4 responses a step, response length, 2 epochs x 2 minibatches (TRL: ``num_iterations``,
  ``steps_per_generation``), temperature, KL coefficient (TRL's ``beta``; RLOO: in the reward, GRPO: a k3 loss term
  with ``loss_type="grpo"``, as cai's) and learning rate; a TRL step is one generation and its optimizer steps. Then
  cai's PPO at the same 16 responses a step (16 prompts, one response each): the RLOO-to-PPO step-time ratio.
- online: online DPO from AI feedback (``ppo.algorithm=online_dpo``, 8 prompts x 2 responses a step, one optimizer
  step) as the real stage, its step split into sampling (``rollout_s``), labeling (``label_s``: the reward alone), the
  log-probs of the policy and the reference (``score_s - label_s``) and the update (``update_s``), medians over the
  steps after the first: labelled by the labeler (``ppo.reward=pairwise``, the model itself as labeler, one principle in
  both orders) against the same step with ``ppo.reward=pm``; on transformers, and on ``--model`` also with vLLM sampling
  the pairs (``ppo.rollout_engine=vllm``) and labeling them (``labeler.engine=vllm``). Which part dominates is printed.
- dpo: the real stage (``python -m cai.stages.dpo``, ``deepspeed=zero0``) against TRL 1.16.0's ``DPOTrainer`` (this
  environment's TRL when it is that version, else installed like the rl part's), each run in a child process with the
  same thread count, alternated. Both train one epoch on the same pairs in the same order: red-team prompts with a
  longer refusal (chosen) and a shorter compliance (rejected) written to ``pairs.jsonl``; TRL gets the pairs cai's stage
  trains on (its held-out pair left out) in cai's first-epoch order, as plain text that TRL tokenises to cai's token
  ids exactly (checked), with a sequential sampler. Same model folder, micro-batch (pairs), max_length, beta, lr, no
  warm-up, linear decay, gradient clipping, ``sigmoid`` loss, fp32, dropout off. TRL gets its fastest settings:
  reference log-probs precomputed (``precompute_ref_log_probs``, at the micro-batch size as cai's pass), no evaluation,
  saving or logging. pairs/s = training pairs / (the reference pass + training, from the first step's start to the
  last step's end), median over runs; peak RSS of each side's process. Then one short run per side with a policy
  moved off its reference (seeded noise on every weight: with policy = reference the first loss is log 2 whatever the
  maths) gives the first step's loss on the same batch, which must agree within 1e-4 (else the part fails). First on
  the tiny random model of the tests, saved to a folder, then on ``--model``.
- generation, labeling and engine run the model in fp32, as they did before ``model.dtype=auto`` chose bf16 on a CPU
  with bf16 instructions, so their figures stay comparable (the precision part measures bf16 against fp32).
- generation: ``cai.generation.generate`` on the same prompts at batch 4 and 16 against one prompt at a time
  (greedy, so all three produce the same tokens); tokens/s.
- labeling: ``cai.feedback.judge_pairs`` — one prefill per (pair, principle, order) reading the next-token
  log-probabilities of the two option labels, with the shared-prefix KV cache — against a naive labeler that
  generates a few tokens after the same answer cue and parses "A" or "B"; both orders, 2 principles;
  comparisons/s (a comparison = one pair under one principle in one order).
- engine: transformers (``engine: hf``, batched ``generate`` and cai's one-prefill labeler) against vLLM's offline
  engine (``engine: vllm``, ``cai.engines``) on the same model, prompts and pairs: the engine's start time, greedy
  replies (how many are the same tokens both ways), tokens/s at batch 16, and labeling comparisons/s (few-shot
  exemplars on, so vLLM's prefix cache has a shared prefix to reuse within a run; it is emptied before each run); and
  the same labeling asked of a local vLLM server of the model (``engine: served``, ``LocalServer`` of ``tests/local_server.py``,
  eight requests in flight), its start and comparisons/s.
- served: labeling asked of a local vLLM server (``LocalServer``, eager, fp32) by the served engine at
  ``served.concurrency`` 1, 8, 64 and 256 (``--concurrency``), alternated in one run: ``cai.feedback.judge_pairs`` as
  ai_feedback asks it (few-shot exemplars on, 4 principles, both orders), every comparison of a call sent together and
  at most that many in flight; comparisons/s and their ratio to one at a time, and the largest label difference
  between concurrencies (the server batches what it holds; the labels must not move). The server's prefix cache is
  emptied before each run, as in the engine part. First on the tiny random model (32 pairs: 256 comparisons a call),
  then on ``--model`` (8 pairs with --quick, else 32). Before them, the client alone: 512 label requests answered by
  a stand-in server (``StubServer``) after 50 ms each, however many it holds (the rate is what the client keeps in
  flight; a server's own limit is out of the picture).
- precision: fp32 against bf16 on ``--model`` (``model.dtype=auto`` picks bf16 on a CPU with bf16 instructions,
  ``cai.models.cpu_has_bf16``): a forward pass, a forward and backward pass (logits at the last 48 positions, as
  PPO's), and greedy generation, on the same 8 prompts; the bf16-to-fp32 speed ratio of each.
- pipeline: each stage's wall time and its process's peak RSS, read from a pipeline run dir (``make demo``'s
  ``runs/demo`` unless ``--pipeline-run``; ``--run-pipeline`` runs the demo pipeline there first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternate(named: dict, repeats: int) -> dict[str, list[float]]:
    """Run each callable once per repeat, in A, B, C, ... order, and collect wall times."""
    times: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(repeats):
        for name, fn in named.items():
            times[name].append(timed(fn)[0])
    return times


def bench_generation(model, tok, prompts: list[list[dict]], max_new_tokens: int, repeats: int) -> dict:
    from cai.generation import generate

    def run(batch_size: int):
        return lambda: generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size,
                                progress=False)

    outputs = {b: run(b)() for b in (1, 4, 16)}  # warm-up, and the tokens each produced
    tokens = sum(len(c.token_ids) for c in outputs[1])
    same = all([c.token_ids for c in outputs[b]] == [c.token_ids for c in outputs[1]] for b in (4, 16))
    times = alternate({f"batch {b}": run(b) for b in (1, 4, 16)}, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "tokens": tokens, "same_tokens": same,
            "seconds": medians, "tokens_per_s": {name: tokens / s for name, s in medians.items()},
            "speedup_vs_batch_1": {name: medians["batch 1"] / s for name, s in medians.items()}, "repeats": repeats}


def bench_precision(model_path: str, prompts: list[list[dict]], max_new_tokens: int, repeats: int) -> dict:
    """fp32 against bf16: seconds for a forward pass, a forward and backward pass, and greedy generation, each on the same
    prompts padded into one batch; bf16/fp32 speed ratios."""
    import torch

    from cai.generation import generate, render_chat
    from cai.models import cpu_has_bf16, load_policy

    loaded = {dtype: load_policy({"path": model_path, "device": "cpu", "dtype": dtype}) for dtype in ("float32", "bfloat16")}
    tok = loaded["float32"][1]
    batch = tok([render_chat(tok, p) for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt")

    def forward(model):
        with torch.no_grad():
            model(**batch)

    def forward_backward(model):
        model.zero_grad(set_to_none=True)
        logits = model(**batch, logits_to_keep=max_new_tokens).logits
        torch.log_softmax(logits.float(), dim=-1).mean().backward()

    def generation(model):
        return generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=len(prompts),
                        progress=False)

    kinds = {"forward": forward, "forward_backward": forward_backward, "generation": generation}
    seconds, warm = {}, {}
    for kind, fn in kinds.items():
        warm[kind] = {dtype: fn(model) for dtype, (model, _) in loaded.items()}  # warm-up (generation: the replies)
        times = alternate({dtype: (lambda m=model, f=fn: f(m)) for dtype, (model, _) in loaded.items()}, repeats)
        seconds[kind] = {dtype: statistics.median(ts) for dtype, ts in times.items()}
    replies = {dtype: [c.token_ids for c in outs] for dtype, outs in warm["generation"].items()}
    same = sum(a == b for a, b in zip(replies["float32"], replies["bfloat16"]))
    return {"cpu_has_bf16": cpu_has_bf16(), "prompts": len(prompts), "tokens": int(batch["attention_mask"].sum()),
            "max_new_tokens": max_new_tokens, "seconds": seconds, "same_greedy_replies": same,
            "bf16_vs_fp32": {kind: s["float32"] / s["bfloat16"] for kind, s in seconds.items()}, "repeats": repeats}


def naive_labels(model, tok, constitution, pairs, *, n_principles: int, seed: int, batch_size: int) -> list[float]:
    """The baseline: for each (pair, principle, order) generate a few tokens after the answer cue and parse the
    label; 1.0 when the first-shown response is picked, 0.0 for the other, 0.5 when neither can be read."""
    from cai.constitution import comparison_messages, sample_principles
    from cai.generation import generate

    prompts, prefixes = [], []
    for pair in pairs:
        for principle in sample_principles(constitution.comparison, n_principles, seed, pair.key):
            for first, second in ((pair.response_a, pair.response_b), (pair.response_b, pair.response_a)):
                messages, prefix = comparison_messages(constitution, pair.conversation, first, second, principle,
                                                       "comparison", False)
                prompts.append(messages)
                prefixes.append(prefix)
    outs = generate(model, tok, prompts, assistant_prefixes=prefixes, max_new_tokens=4, temperature=0.0,
                    batch_size=batch_size, progress=False)
    labels = []
    for o in outs:
        text = o.text.strip().lstrip("(").upper()
        labels.append(1.0 if text.startswith("A") else 0.0 if text.startswith("B") else 0.5)
    return labels


def bench_labeling(model, tok, constitution, pairs, n_principles: int, batch_size: int, repeats: int) -> dict:
    from cai.feedback import judge_pairs

    def ours():
        return judge_pairs(model, tok, constitution, pairs, n_principles=n_principles, seed=0, few_shot=False,
                           batch_size=batch_size, progress=False)

    def naive():
        return naive_labels(model, tok, constitution, pairs, n_principles=n_principles, seed=0, batch_size=batch_size)

    ours()  # warm-up
    unread = naive().count(0.5)  # answers the naive labeler could not parse
    comparisons = len(pairs) * n_principles * 2
    times = alternate({"one prefill (cai)": ours, "generate and parse": naive}, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"pairs": len(pairs), "n_principles": n_principles, "comparisons": comparisons, "seconds": medians,
            "comparisons_per_s": {name: comparisons / s for name, s in medians.items()},
            "speedup": medians["generate and parse"] / medians["one prefill (cai)"], "naive_unparsed": unread,
            "repeats": repeats}


def bench_engine(model_path: str, prompts: list[list[dict]], pairs, constitution, max_new_tokens: int, repeats: int) -> dict:
    """transformers against vLLM on one model: start time, greedy generation, labeling; and labeling by a local vLLM
    server (``engine: served``) of the same model (see the module docstring)."""
    import urllib.request

    from cai.engines import engine_folder, load_generator
    from cai.feedback import judge_pairs
    from cai.generation import generate
    from tests.local_server import LocalServer  # a test harness, not part of cai (ROOT is on sys.path)

    # fp32 as every engine figure before model.dtype=auto chose bf16 on this CPU (the precision part compares the two)
    spec = {"path": model_path, "device": "auto", "dtype": "float32", "trust_remote_code": False, "key": "model.path"}
    starts = {}
    starts["hf"], (model, tok) = timed(lambda: load_generator({**spec, "engine": "hf"}))
    starts["vllm"], (engine, _) = timed(lambda: load_generator({**spec, "engine": "vllm", "vllm": {"cpu_kv_cache_gib": 2}}))
    # the server's dev mode offers POST /reset_prefix_cache, for the same cold start as the in-process engine's
    server = LocalServer(engine_folder(spec, tok), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                         cpu_kv_cache_gib=2, env={"VLLM_SERVER_DEV_MODE": "1"})
    starts["served"], (remote, _) = timed(lambda: (server.start(), load_generator({**spec, "engine": "served",
                                                                                   "served": {"url": server.url}}))[1])

    def cold(m) -> None:
        """Empty vLLM's prefix cache: a timed run must not reuse the prompts of the run before it (the same ones)."""
        if m is engine:
            engine.llm.reset_prefix_cache()
        if m is remote:
            urllib.request.urlopen(urllib.request.Request(server.url.removesuffix("/v1") + "/reset_prefix_cache",
                                                          method="POST"), timeout=60).close()

    def replies(m):
        return lambda: (cold(m), generate(m, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=16,
                                          progress=False))[1]

    def labels(m):
        return lambda: (cold(m), judge_pairs(m, tok, constitution, pairs, n_principles=2, seed=0, few_shot=True,
                                             batch_size=16, progress=False))[1]

    outs = {"hf": replies(model)(), "vllm": replies(engine)()}  # warm-up, and the tokens each produced
    same = sum(a.token_ids == b.token_ids for a, b in zip(outs["hf"], outs["vllm"]))
    tokens = {name: sum(len(c.token_ids) for c in out) for name, out in outs.items()}
    judged = {"hf": labels(model)(), "vllm": labels(engine)(), "served": labels(remote)()}
    gap = max(abs(a.p_a - b.p_a) for a, b in zip(judged["hf"], judged["vllm"]))
    served_gap = max(abs(a.p_a - b.p_a) for a, b in zip(judged["hf"], judged["served"]))
    gen = {n: statistics.median(ts) for n, ts in alternate({"hf": replies(model), "vllm": replies(engine)}, repeats).items()}
    lab = {n: statistics.median(ts) for n, ts in alternate({"hf": labels(model), "vllm": labels(engine),
                                                           "served": labels(remote)}, repeats).items()}
    engine.close()
    remote.close()
    server.stop()
    comparisons = len(pairs) * 2 * 2
    return {"model": model_path, "start_s": starts, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "same_greedy_replies": same, "tokens": tokens, "generation_s": gen,
            "tokens_per_s": {n: tokens[n] / t for n, t in gen.items()}, "generation_vllm_vs_hf": gen["hf"] / gen["vllm"],
            "pairs": len(pairs), "comparisons": comparisons, "labeling_s": lab,
            "comparisons_per_s": {n: comparisons / t for n, t in lab.items()}, "labeling_vllm_vs_hf": lab["hf"] / lab["vllm"],
            "served_vs_hf": lab["hf"] / lab["served"], "largest_label_difference": gap,
            "largest_served_label_difference": served_gap, "repeats": repeats}


SERVED_CONCURRENCY = (1, 8, 64, 256)


def bench_served(model_path: str, tiny: dict | None, pairs, constitution, concurrencies, repeats: int) -> dict:
    """Labeling by a local vLLM server of ``model_path`` against ``served.concurrency`` (see the module docstring)."""
    import urllib.request

    from cai.engines import engine_folder, load_generator
    from cai.feedback import judge_pairs
    from cai.models import load_tokenizer
    from tests.local_server import LocalServer  # a test harness, not part of cai (ROOT is on sys.path)

    spec = {"path": model_path, "tiny": tiny, "device": "cpu", "dtype": "float32", "trust_remote_code": False,
            "key": "labeler.path", "role": "labeler"}
    tok = load_tokenizer(spec)
    # dev mode: POST /reset_prefix_cache, so every run starts as cold as the first
    server = LocalServer(engine_folder(spec, tok), cpu_kv_cache_gib=2, env={"VLLM_SERVER_DEV_MODE": "1"})
    start_s, _ = timed(server.start)
    try:
        engines = {c: load_generator({**spec, "engine": "served", "served": {"url": server.url, "concurrency": c}})[0]
                   for c in concurrencies}

        def labels(c: int):
            urllib.request.urlopen(urllib.request.Request(server.url.removesuffix("/v1") + "/reset_prefix_cache",
                                                          method="POST"), timeout=60).close()
            return judge_pairs(engines[c], tok, constitution, pairs, n_principles=4, seed=0, few_shot=True, progress=False)

        judge_pairs(engines[concurrencies[-1]], tok, constitution, pairs[:2], n_principles=4, seed=0, progress=False)  # warm-up
        seconds: dict[int, list[float]] = {c: [] for c in concurrencies}
        judged = {}
        for _ in range(repeats):
            for c in concurrencies:
                t, judged[c] = timed(lambda c=c: labels(c))
                seconds[c].append(t)
    finally:
        server.stop()
    comparisons = len(pairs) * 4 * 2
    rate = {c: comparisons / statistics.median(ts) for c, ts in seconds.items()}
    gap = max(abs(a.p_a - b.p_a) for c in concurrencies for a, b in zip(judged[concurrencies[0]], judged[c]))
    return {"model": model_path, "start_s": start_s, "pairs": len(pairs), "comparisons": comparisons, "repeats": repeats,
            "seconds": {str(c): ts for c, ts in seconds.items()},
            "comparisons_per_s": {str(c): r for c, r in rate.items()},
            "vs_one_at_a_time": {str(c): r / rate[concurrencies[0]] for c, r in rate.items()},
            "largest_label_difference": gap}


def bench_served_client(concurrencies, repeats: int, latency: float = 0.05, requests: int = 512) -> dict:
    """The served client alone: label requests answered by ``StubServer`` after ``latency`` seconds each, however many
    it holds, so the rate is what the client keeps in flight (ideal: concurrency / latency)."""
    from types import SimpleNamespace

    from cai.engines import ServedEngine
    from tests.local_server import StubServer

    contexts, candidates = [[i] for i in range(requests)], [[5, 6]] * requests
    with StubServer(latency=latency) as stub:
        engines = {c: ServedEngine({"path": "stub", "role": "labeler", "served": {"url": stub.url, "concurrency": c}},
                                   SimpleNamespace(eos_token_id=0)) for c in concurrencies}
        times = alternate({c: (lambda c=c: engines[c].next_token_logprobs(contexts, candidates)) for c in concurrencies},
                          repeats)
    rate = {c: requests / statistics.median(ts) for c, ts in times.items()}
    return {"latency_s": latency, "comparisons": requests, "repeats": repeats,
            "comparisons_per_s": {str(c): r for c, r in rate.items()},
            "ideal_per_s": {str(c): c / latency for c in concurrencies},
            "vs_one_at_a_time": {str(c): r / rate[concurrencies[0]] for c, r in rate.items()}}


# ---------------------------------------------------------------------------------------------
# PPO: the cai stage against TRL 1.12's PPOTrainer
# ---------------------------------------------------------------------------------------------

TRL_VERSION = "1.12.0"  # the last TRL release with PPO (trl.experimental.ppo)
TRL_RL_VERSION = "1.16.0"  # TRL's maintained RLOOTrainer and GRPOTrainer


def trl_side_folder(folder: Path, version: str) -> Path:
    """TRL ``version`` installed with --no-deps into ``folder/trl-<version>`` (once), away from the project's
    environment; the TRL worker puts it first on its path. Its dependencies (accelerate, datasets, transformers) are
    ours."""
    import subprocess

    side = folder / f"trl-{version}"
    if not (side / f"trl-{version}.dist-info").exists():
        print(f"installing trl=={version} into {side} (--no-deps; the project's environment is untouched)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(side), f"trl=={version}"], check=True)
    return side


def ppo_models(model_path: str, folder: Path) -> Path:
    """The four PPO roles from one model: ``policy/`` (policy and reference) and ``pm/`` (reward and the
    value model's start: the same backbone with a seeded scalar head), both with the tokenizer. Built once."""
    import torch

    from cai.models import load_policy, load_preference_model

    if not (folder / "pm" / "config.json").exists():
        spec = {"path": model_path, "device": "cpu", "dtype": "float32", "trust_remote_code": False}
        policy, tok = load_policy(spec)
        policy.save_pretrained(folder / "policy")
        tok.save_pretrained(folder / "policy")
        torch.manual_seed(0)
        pm, _ = load_preference_model(spec)
        pm.save_pretrained(folder / "pm")
        tok.save_pretrained(folder / "pm")
    return folder


def prompt_pool(tok, n_prompts: int, max_prompt_length: int) -> list[tuple[list[dict], list[int]]]:
    """(conversation, query token ids) of each prompt exactly as cai's PPO stage builds its pool (built-in red-team
    prompts, seed 0, chat template, too-long ones left out): TRL's PPO takes the ids, its RLOO and GRPO the
    conversations (they apply the chat template themselves)."""
    from cai.data import load_prompts
    from cai.generation import render_chat

    items = load_prompts(None, "prompt", "red_team", n_prompts, 0)
    pool = [(it.messages(), tok(render_chat(tok, it.messages()), add_special_tokens=False)["input_ids"]) for it in items]
    return [(conversation, ids) for conversation, ids in pool if len(ids) <= max_prompt_length]


def run_cai_ppo(models: Path, s: dict, work: Path, threads: int) -> dict:
    """The real stage, as a user runs it: ``python -m cai.stages.ppo`` with the PM as reward (``s["algorithm"]`` with
    ``s["k"]`` responses per prompt when given); per-step seconds from its metrics.jsonl."""
    import shutil
    import subprocess

    run_dir = work / "cai-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", "progress=false", f"model.path={models / 'policy'}", "model.device=cpu",
                 "model.dtype=float32", f"ppo.policy={models / 'policy'}", f"ppo.reward_model={models / 'pm'}",
                 f"ppo.num_prompts={s['num_prompts']}", f"ppo.steps={s['steps']}", f"ppo.batch_size={s['batch_size']}",
                 f"ppo.num_minibatches={s['num_minibatches']}", f"ppo.ppo_epochs={s['ppo_epochs']}",
                 f"ppo.max_new_tokens={s['response_length']}", f"ppo.temperature={s['temperature']}",
                 f"ppo.kl_coef={s['kl_coef']}", f"ppo.lr={s['lr']}", f"ppo.value_lr={s['lr']}",
                 f"ppo.max_prompt_length={s['max_prompt_length']}", f"ppo.save_every={s['steps']}", "ppo.num_helpful=0",
                 f"ppo.log_samples_every={s['steps']}", f"generation.batch_size={s['batch_size'] * s.get('k', 1)}",
                 f"ppo.algorithm={s.get('algorithm', 'ppo')}", f"ppo.samples_per_prompt={s.get('k', 1)}", *s.get("extra", [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cai.stages.ppo", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cai ppo failed: {done.stderr.strip()[-2000:]}")
    from cai.metrics import read_metrics

    rows = [m for m in read_metrics(run_dir / "ppo") if "seconds" in m]
    return {"step_seconds": [m["seconds"] for m in rows], "response_length": [m["response_length"] for m in rows],
            **{key: [m[key] for m in rows] for key in ("rollout_s", "label_s", "score_s", "update_s")}}


def run_trl(models: Path, s: dict, work: Path, threads: int, side: Path | None) -> dict:
    """A TRL trainer in a child process (the TRL in ``side`` first on its path; None: this environment's): PPOTrainer,
    or ``s["trainer"]`` (rloo, grpo: the same models, prompts, batch, response length, epochs and minibatches as cai's
    run; per-step seconds from a step-end callback; dpo: see ``trl_dpo_worker``)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"PYTHONPATH": str(side)} if side else {})}
    spec = json.dumps({"models": str(models), "work": str(work), **s})
    done = subprocess.run([sys.executable, __file__, "--trl-worker", spec], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL {s.get('trainer', 'ppo')} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def trl_worker(spec_json: str) -> None:
    """One TRL run in this child process: PPO (TRL 1.12) or, with ``trainer`` in the spec, RLOO / GRPO / DPO (TRL 1.16)."""
    s = json.loads(spec_json)
    if s.get("trainer") == "dpo":
        trl_dpo_worker(s)
        return
    if s.get("trainer", "ppo") != "ppo":
        trl_rl_worker(s)
        return
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"the TRL worker needs trl=={TRL_VERSION} first on PYTHONPATH, found {trl.__version__}")
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    models = Path(s["models"])
    tok = AutoTokenizer.from_pretrained(models / "policy")
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(models / "pm", dtype=torch.float32, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(models / "pm", dtype=torch.float32, num_labels=1)
    queries = [ids for _, ids in prompt_pool(tok, s["num_prompts"], s["max_prompt_length"])]
    data = Dataset.from_dict({"input_ids": queries})

    timer = step_timer()
    args = PPOConfig(
        output_dir=str(Path(s["work"]) / "trl-run"), seed=0, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["num_minibatches"], num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=s["batch_size"], total_episodes=s["steps"] * s["batch_size"],
        response_length=s["response_length"], temperature=s["temperature"], stop_token="eos",
        missing_eos_penalty=1.0, kl_coef=s["kl_coef"], learning_rate=s["lr"], num_sample_generations=0,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference, reward_model=reward,
                         value_model=value, train_dataset=data, eval_dataset=data.select(range(s["batch_size"])),
                         callbacks=[timer])
    trainer.train()
    print(json.dumps({"step_seconds": timer.seconds}))


def step_timer():
    """A TrainerCallback recording the seconds between consecutive optimizer steps (the first from train begin)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last, self.seconds = None, []

        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            self.seconds.append(round(now - self.last, 3))
            self.last = now

    return StepTimer()


# Same settings on both sides. response_length = cai's ppo.max_new_tokens; lr is both the policy's and the
# value model's (TRL has one optimizer over both); TRL's micro-batch is its minibatch (gradient_accumulation_steps=1),
# cai's is batch_size / num_minibatches: one optimizer step per minibatch on both sides.
PPO_TINY = dict(num_prompts=64, steps=6, batch_size=8, num_minibatches=2, ppo_epochs=2, response_length=32,
                temperature=0.7, kl_coef=0.05, lr=1e-5, max_prompt_length=256)
PPO_EMBEDDED = {**PPO_TINY, "steps": 5, "response_length": 48}
PPO_EMBEDDED_QUICK = {**PPO_TINY, "steps": 3}


def bench_ppo(model_path: str, s: dict, work: Path, threads: int, repeats: int, side: Path) -> dict:
    """Alternate cai and TRL runs; per run, the median step time after the first (warm-up) step; the
    figures are medians over runs."""
    models = ppo_models(model_path, work / "models")
    runs = {"cai": [], "trl": []}
    for _ in range(repeats):
        runs["cai"].append(run_cai_ppo(models, s, work, threads))
        runs["trl"].append(run_trl(models, s, work, threads, side))
    step = {k: statistics.median(statistics.median(r["step_seconds"][1:]) for r in v) for k, v in runs.items()}
    per_s = {k: s["batch_size"] / t for k, t in step.items()}
    return {"model": model_path, "settings": s, "repeats": repeats, "step_seconds": step, "samples_per_s": per_s,
            "ratio": per_s["cai"] / per_s["trl"], "runs": runs}


# ---------------------------------------------------------------------------------------------
# RL: cai's critic-free methods against TRL 1.16's RLOOTrainer and GRPOTrainer, and cai's RLOO against cai's PPO
# ---------------------------------------------------------------------------------------------

def trl_rl_worker(s: dict) -> None:
    """TRL's RLOOTrainer or GRPOTrainer with cai's step shape: one generation of ``batch_size x k`` completions, then
    ``ppo_epochs`` passes (``num_iterations``) over ``num_minibatches`` minibatches (``steps_per_generation``), one
    optimizer step each. Prints the seconds of each such cycle (the sum of its optimizer steps' times)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if trl.__version__ != TRL_RL_VERSION:
        raise SystemExit(f"the TRL worker needs trl=={TRL_RL_VERSION} first on PYTHONPATH, found {trl.__version__}")
    models = Path(s["models"])
    tok = AutoTokenizer.from_pretrained(models / "policy")
    policy = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(models / "pm", dtype=torch.float32, num_labels=1)
    data = Dataset.from_list([{"prompt": m} for m, _ in prompt_pool(tok, s["num_prompts"], s["max_prompt_length"])])
    samples = s["batch_size"] * s["k"]
    common = dict(
        output_dir=str(Path(s["work"]) / "trl-run"), seed=0, use_cpu=True, bf16=False, fp16=False, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0,
        per_device_train_batch_size=samples // s["num_minibatches"], gradient_accumulation_steps=1,
        steps_per_generation=s["num_minibatches"], num_iterations=s["ppo_epochs"], num_generations=s["k"],
        max_steps=s["steps"] * s["num_minibatches"] * s["ppo_epochs"], max_completion_length=s["response_length"],
        temperature=s["temperature"], top_p=1.0, top_k=0, beta=s["kl_coef"], learning_rate=s["lr"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, disable_dropout=True,
    )
    if s["trainer"] == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        args = Config(**common)
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        args = Config(**common, loss_type="grpo", scale_rewards="group")
    timer = step_timer()
    trainer = Trainer(model=policy, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                      reward_processing_classes=tok, callbacks=[timer])
    trainer.train()
    per_cycle = s["num_minibatches"] * s["ppo_epochs"]
    cycles = [round(sum(timer.seconds[i:i + per_cycle]), 3) for i in range(0, len(timer.seconds), per_cycle)]
    print(json.dumps({"step_seconds": cycles}))


# Same settings on both sides: batch_size prompts x k responses a step, split into num_minibatches, ppo_epochs passes;
# the KL coefficient is TRL's beta (RLOO: in the reward, k1, as cai's rloo; GRPO: a k3 loss term, as cai's grpo, with
# TRL's loss_type="grpo", the per-response token mean of cai's grpo). cai's PPO step for the 0.6x target sees the
# same number of responses (batch_size x k prompts, one response each) with the same minibatches and epochs.
RL_TINY = dict(num_prompts=64, steps=6, batch_size=4, k=4, num_minibatches=2, ppo_epochs=2, response_length=32,
               temperature=0.7, kl_coef=0.05, lr=1e-5, max_prompt_length=256)
RL_EMBEDDED = {**RL_TINY, "steps": 4, "response_length": 48}
RL_EMBEDDED_QUICK = {**RL_TINY, "steps": 3}


def bench_rl(model_path: str, s: dict, work: Path, threads: int, repeats: int, side: Path) -> dict:
    """Per algorithm (rloo, grpo) alternate cai and TRL runs, then cai's PPO at the same number of responses; per run,
    the median step time after the first (warm-up) step; the figures are medians over runs."""
    models = ppo_models(model_path, work / "models")
    ppo_shape = {**s, "batch_size": s["batch_size"] * s["k"], "k": 1, "algorithm": "ppo"}
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for algorithm in ("rloo", "grpo"):
            runs.setdefault(f"cai {algorithm}", []).append(run_cai_ppo(models, {**s, "algorithm": algorithm}, work, threads))
            runs.setdefault(f"trl {algorithm}", []).append(run_trl(models, {**s, "trainer": algorithm}, work, threads, side))
        runs.setdefault("cai ppo", []).append(run_cai_ppo(models, ppo_shape, work, threads))
    step = {k: statistics.median(statistics.median(r["step_seconds"][1:]) for r in v) for k, v in runs.items()}
    samples = s["batch_size"] * s["k"]
    per_s = {k: samples / t for k, t in step.items()}
    return {"model": model_path, "settings": s, "repeats": repeats, "step_seconds": step, "samples_per_s": per_s,
            "ratio_vs_trl": {a: per_s[f"cai {a}"] / per_s[f"trl {a}"] for a in ("rloo", "grpo")},
            "rloo_step_vs_ppo_step": step["cai rloo"] / step["cai ppo"], "runs": runs}


ONLINE_TINY = dict(num_prompts=64, steps=5, batch_size=8, k=2, num_minibatches=1, ppo_epochs=1, response_length=32,
                   temperature=0.7, kl_coef=0.1, lr=1e-5, max_prompt_length=256, algorithm="online_dpo")
ONLINE_EMBEDDED = {**ONLINE_TINY, "response_length": 48}
ONLINE_EMBEDDED_QUICK = {**ONLINE_EMBEDDED, "steps": 3}
# the labeler (the policy's own model: run_cai_ppo's model.path) or the PM labels each pair; vLLM samples and labels
ONLINE_VARIANTS = {
    "labeler, hf": ["ppo.reward=pairwise"],
    "pm, hf": ["ppo.reward=pm"],
    "labeler, vllm": ["ppo.reward=pairwise", "ppo.rollout_engine=vllm", "policy.vllm.cpu_kv_cache_gib=1",
                      "labeler.engine=vllm", "labeler.vllm.cpu_kv_cache_gib=1"],
    "pm, vllm": ["ppo.reward=pm", "ppo.rollout_engine=vllm", "policy.vllm.cpu_kv_cache_gib=1"],
}
ONLINE_PARTS = ("sampling", "labeling", "log-probs", "update")


def bench_online(model_path: str, s: dict, work: Path, threads: int, repeats: int, variants) -> dict:
    """Alternate the variants' runs; per run, the median after the first step of each part's seconds (sampling,
    labeling, the reference's and policy's log-probs, the update) and of the whole step; medians over runs."""
    models = ppo_models(model_path, work / "models")
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name in variants:
            runs.setdefault(name, []).append(run_cai_ppo(models, {**s, "extra": ONLINE_VARIANTS[name]}, work, threads))

    def median_of(name: str, per_step) -> float:
        return statistics.median(statistics.median(per_step(r, i) for i in range(1, len(r["step_seconds"])))
                                 for r in runs[name])

    parts = {name: {"sampling": median_of(name, lambda r, i: r["rollout_s"][i]),
                    "labeling": median_of(name, lambda r, i: r["label_s"][i]),
                    "log-probs": median_of(name, lambda r, i: r["score_s"][i] - r["label_s"][i]),
                    "update": median_of(name, lambda r, i: r["update_s"][i]),
                    "step": median_of(name, lambda r, i: r["step_seconds"][i])} for name in variants}
    return {"model": model_path, "settings": s, "repeats": repeats, "seconds": parts,
            "dominant": {name: max(ONLINE_PARTS, key=lambda k: parts[name][k]) for name in variants},
            "pairs_per_s": {name: s["batch_size"] / parts[name]["step"] for name in variants}, "runs": runs}


# ---------------------------------------------------------------------------------------------
# DPO: the cai stage against TRL 1.16's DPOTrainer
# ---------------------------------------------------------------------------------------------

# Harmless replies of different lengths for red-team prompts: a refusal with 1-4 safer suggestions (chosen) against a
# curt 1-3 sentence compliance (rejected). The text only has to be the same on both sides; its lengths set the shapes.
REFUSAL = "I can't help with that: it could get someone hurt."
SAFER = ("If you feel unsafe, please contact your local emergency services.",
         "Talking it through with someone you trust often helps more than you would expect.",
         "A mediator can help settle a dispute like this without anyone getting hurt.",
         "I am happy to help you find a safer way to deal with the situation.",
         "Many places offer free and confidential advice lines, open day and night.")
COMPLY = ("Sure, that is easy.", "Here is what you could try first.", "Just make sure that nobody sees you.")

# Same settings on both sides: pairs in the file (one held out by cai's stage, which always holds out at least one:
# the rest, a multiple of the micro-batch, are the training pairs), micro-batch in pairs, max_length, beta, lr, epochs
# (1: every batch is the same on both sides, see dpo_train_rows), the sigmoid loss, no warm-up, linear decay, grad clip.
# moved_noise: how far the loss check's policy is moved off its reference (policy_folder), so that its first-step loss
# is far from log 2 (tiny: 0.83, embedded: 1.82).
DPO_TINY = dict(pairs=65, eval_fraction=0.02, micro_batch_size=4, max_length=512, beta=0.1, lr=1e-5, epochs=1, seed=0,
                moved_noise=1.0)
DPO_EMBEDDED = {**DPO_TINY, "pairs": 33, "moved_noise": 0.1}
DPO_EMBEDDED_QUICK = {**DPO_EMBEDDED, "pairs": 17}
LOSS_TOLERANCE = 1e-4  # the two sides' first-step losses must agree this closely, or the ratio compares different maths


def dpo_pairs_file(path: Path, n: int) -> Path:
    """``n`` preference pairs in TRL's conversational format (``prompt`` a user turn, ``chosen`` and ``rejected``
    strings), the prompts from cai/prompts/red_team.jsonl (cycled past its 100)."""
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "cai" / "prompts" / "red_team.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        chosen = " ".join([REFUSAL, *(SAFER[(i + j) % len(SAFER)] for j in range(1 + i % 4))])
        rows.append({"prompt": [{"role": "user", "content": prompts[i % len(prompts)]}], "chosen": chosen,
                     "rejected": " ".join(COMPLY[:1 + i % 3])})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def policy_folder(model_path: str, folder: Path, noise: float = 0.0) -> Path:
    """The model and its tokenizer saved to ``folder`` (built once), so that both sides load the same files; with
    ``noise``, every weight tensor w moves by noise * std(w) * N(0, 1) (seeded): a policy that differs from the
    reference, for a first-step loss other than log 2."""
    import torch

    from cai.models import load_policy

    if not (folder / "config.json").exists():
        model, tok = load_policy({"path": model_path, "device": "cpu", "dtype": "float32", "trust_remote_code": False})
        if noise:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.numel() > 1:
                        p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def dpo_train_rows(folder: Path, pairs_file: Path, s: dict) -> dict:
    """What cai's stage trains on, for TRL: its training pairs (its held-out split left out) in the order of its first
    epoch, as TRL's plain-text rows (the prompt rendered by the chat template with the generation prompt, each reply
    ending with EOS), and cai's token ids of each, which the TRL worker checks its own tokenisation against."""
    from types import SimpleNamespace

    from cai import preference, training
    from cai.models import load_tokenizer
    from cai.stages.dpo import STAGE, encode_pairs

    tok = load_tokenizer({"path": str(folder)})
    comparisons, _ = preference.load_comparisons(str(pairs_file), "pairs", key="dpo.pairs", builtin=pairs_file,
                                                 seed=s["seed"])
    train, _ = preference.split_holdout(comparisons, s["eval_fraction"], s["seed"], STAGE, "dpo.eval_fraction")
    encoded, counts = encode_pairs(tok, train, s["max_length"], str(pairs_file))
    if len(encoded) != len(train) or counts["truncated_context"] or len(train) % s["micro_batch_size"]:
        raise SystemExit(f"dpo bench: {len(train)} training pairs must all fit max_length uncut and fill whole batches")
    plan = training.plan_for(STAGE, SimpleNamespace(micro_batch_size=s["micro_batch_size"], grad_accum=1,
                                                    epochs=s["epochs"]), len(train), 1, s["seed"])
    order = plan.epoch_order(0)
    rows = [{"prompt": tok.apply_chat_template(train[i].messages(), tokenize=False, add_generation_prompt=True),
             "chosen": train[i].chosen + tok.eos_token, "rejected": train[i].rejected + tok.eos_token} for i in order]
    ids = [{"prompt_ids": encoded[i].prompt, "chosen_ids": encoded[i].chosen, "rejected_ids": encoded[i].rejected}
           for i in order]
    return {"rows": rows, "ids": ids}


def run_cai_dpo(policy: Path, reference: Path | None, pairs_file: Path, s: dict, work: Path, threads: int) -> dict:
    """The real stage, as a user runs it: ``python -m cai.stages.dpo`` on ``pairs_file`` (``dpo.reference`` when
    ``reference`` is given; else the reference is the starting weights). Its reference pass (the manifest's
    reference_s) and its training (from the first step's start to the last step's end, metrics.jsonl), the first
    step's loss and the process's peak RSS (manifest)."""
    import shutil
    import subprocess

    from cai.lineage import read_manifest
    from cai.metrics import read_metrics

    run_dir = work / "cai-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", "progress=false", f"model.path={policy}", "model.device=cpu", "model.dtype=float32",
                 "deepspeed=zero0", f"seed={s['seed']}", f"dpo.pairs={pairs_file}", "dpo.loss=sigmoid",
                 f"dpo.beta={s['beta']}", f"dpo.lr={s['lr']}", f"dpo.epochs={s['epochs']}",
                 f"dpo.micro_batch_size={s['micro_batch_size']}", "dpo.grad_accum=1", f"dpo.max_length={s['max_length']}",
                 f"dpo.eval_fraction={s['eval_fraction']}", "dpo.warmup_ratio=0.0", "dpo.weight_decay=0.0",
                 "dpo.grad_clip=1.0", "dpo.save_every=100000", f"dpo.reference={reference or 'null'}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cai.stages.dpo", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cai dpo failed: {done.stderr.strip()[-2000:]}")
    rows = [m for m in read_metrics(run_dir / "dpo") if "seconds" in m]
    manifest = read_manifest(run_dir / "dpo")
    return {"reference_seconds": manifest["reference_s"],
            "train_seconds": round(rows[-1]["time"] - rows[0]["time"] + rows[0]["seconds"], 3),
            "steps": len(rows), "first_loss": rows[0]["loss"], "peak_rss_mb": manifest["resources"]["peak_rss_mb"],
            "train_pairs": manifest["counts"]["train_pairs"]}


def trl_dpo_worker(s: dict) -> None:
    """TRL's DPOTrainer on the rows of ``dpo_train_rows`` in their order (sequential sampler), with cai's settings and
    its fastest ones: reference log-probs precomputed (at the micro-batch size, as cai's pass), no evaluation, no
    saving, no logging. Checks that its token ids are cai's, computes the first batch's loss before training (outside
    the timed parts), and prints the reference pass's and the training's seconds and this process's peak RSS."""
    import resource

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trl.__version__ != TRL_RL_VERSION:
        raise SystemExit(f"the TRL worker needs trl=={TRL_RL_VERSION}, found {trl.__version__}")
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """Times the reference pass, which DPOTrainer runs in its constructor."""
        reference_seconds = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                self.reference_seconds += time.perf_counter() - start

    data = json.loads(Path(s["rows_file"]).read_text())
    tok = AutoTokenizer.from_pretrained(s["models"])
    model = AutoModelForCausalLM.from_pretrained(s["models"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(s["reference"], dtype=torch.float32) if s.get("reference") else None
    args = DPOConfig(
        output_dir=str(Path(s["work"]) / "trl-run"), seed=s["seed"], use_cpu=True, bf16=False, fp16=False, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential", per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=s["epochs"], learning_rate=s["lr"], lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, disable_dropout=True,
        beta=s["beta"], loss_type=["sigmoid"], max_length=s["max_length"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=s["micro_batch_size"],
    )
    timer = step_timer()
    trainer = TimedDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(data["rows"]),
                              processing_class=tok, callbacks=[timer])
    tokens = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]
    if tokens != data["ids"]:
        raise SystemExit("TRL's token ids differ from cai's: the two sides would not train on the same pairs")
    with torch.no_grad():
        first_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))).item()
    trainer.train()
    print(json.dumps({"reference_seconds": round(trainer.reference_seconds, 3), "train_seconds": round(sum(timer.seconds), 3),
                      "steps": len(timer.seconds), "first_loss": first_loss, "train_pairs": len(tokens),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def trl_for_dpo(folder: Path) -> Path | None:
    """None when this environment's TRL is TRL_RL_VERSION (the worker then runs it), else that version in a side
    folder (``trl_side_folder``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("trl") == TRL_RL_VERSION:
            return None
    except PackageNotFoundError:
        pass
    return trl_side_folder(folder, TRL_RL_VERSION)


def bench_dpo(model_path: str, s: dict, work: Path, threads: int, repeats: int, side: Path | None) -> dict:
    """Alternate cai and TRL runs on the same pairs; per side, median seconds of the reference pass plus training, and
    pairs/s = training pairs x epochs / those seconds (the reference pass included); peak RSS; then the first-step
    loss of both sides on one batch with a policy that differs from its reference (see ``policy_folder``)."""
    policy = policy_folder(model_path, work / "models" / "policy")
    pairs = dpo_pairs_file(work / "pairs.jsonl", s["pairs"])
    rows_file = work / "trl-rows.json"
    rows_file.write_text(json.dumps(dpo_train_rows(policy, pairs, s)))
    trl_spec = {**s, "trainer": "dpo", "rows_file": str(rows_file)}
    runs: dict[str, list[dict]] = {"cai": [], "trl": []}
    for _ in range(repeats):
        runs["cai"].append(run_cai_dpo(policy, None, pairs, s, work, threads))
        runs["trl"].append(run_trl(policy, trl_spec, work, threads, side))
    seconds = {k: statistics.median(r["reference_seconds"] + r["train_seconds"] for r in v) for k, v in runs.items()}
    n = runs["cai"][0]["train_pairs"] * s["epochs"]
    per_s = {k: n / t for k, t in seconds.items()}
    rss = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()}

    # the first-step loss: a policy moved off the reference, else both sides give log 2 whatever they compute
    moved = policy_folder(model_path, work / "models" / f"moved-{s['moved_noise']}", noise=s["moved_noise"])
    check_s = {**s, "pairs": s["micro_batch_size"] + 1}  # one step (one pair held out)
    check_pairs = dpo_pairs_file(work / "check-pairs.jsonl", check_s["pairs"])
    check_rows = work / "trl-check-rows.json"
    check_rows.write_text(json.dumps(dpo_train_rows(moved, check_pairs, check_s)))
    cai_check = run_cai_dpo(moved, policy, check_pairs, check_s, work / "check", threads)
    trl_check = run_trl(moved, {**check_s, "trainer": "dpo", "rows_file": str(check_rows), "reference": str(policy)},
                        work / "check", threads, side)
    return {"model": model_path, "settings": s, "repeats": repeats, "train_pairs": runs["cai"][0]["train_pairs"],
            "seconds": seconds, "pairs_per_s": per_s, "ratio": per_s["cai"] / per_s["trl"], "peak_rss_mb": rss,
            "first_loss": {"cai": cai_check["first_loss"], "trl": trl_check["first_loss"]},
            "first_loss_difference": abs(cai_check["first_loss"] - trl_check["first_loss"]),
            "first_loss_agrees": abs(cai_check["first_loss"] - trl_check["first_loss"]) <= LOSS_TOLERANCE, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Pipeline: each stage's wall time and peak memory from a run dir (make demo's by default)
# ---------------------------------------------------------------------------------------------

def run_pipeline(run_dir: Path, threads: int) -> None:
    """``python -m cai.pipeline run_dir=...`` as make demo runs it (complete stages there are skipped: point
    ``--pipeline-run`` at a new folder to time every stage)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "cai.pipeline", f"run_dir={run_dir}"], cwd=ROOT, env=env, check=True)


def pipeline_table(run_dir: Path) -> dict | None:
    """Per stage: status, amount, wall seconds of the run that computed it and that process's peak RSS (from
    its manifest), or None when ``run_dir`` holds no pipeline run."""
    from cai.lineage import read_manifest

    record = run_dir / "pipeline.json"
    if not record.exists():
        return None
    rows = []
    for row in json.loads(record.read_text())["stages"]:
        manifest = read_manifest(run_dir / row["stage"]) or {}
        # a stage the pipeline ran: its process's wall time; one it skipped: the stage's own time from its manifest
        seconds = row["seconds"] if row["status"] == "ran" else manifest.get("timings", {}).get("total_s")
        rows.append({"stage": row["stage"], "amount": row.get("amount"), "seconds": seconds,
                     "peak_rss_mb": manifest.get("resources", {}).get("peak_rss_mb"), "status": manifest.get("status")})
    return {"run_dir": str(run_dir), "stages": rows, "total_s": round(sum(r["seconds"] or 0 for r in rows), 1),
            "peak_rss_mb": max((r["peak_rss_mb"] or 0 for r in rows), default=None) or None}


def print_pipeline(table: dict | None, run_dir: Path) -> None:
    if table is None:
        print(f"pipeline: no run in {run_dir}; run `make demo` first (or add --run-pipeline) for each stage's time and memory")
        return
    print(f"pipeline ({run_dir}): wall time of the run that computed each stage, peak RSS of its process")
    for r in table["stages"]:
        memory = f"{r['peak_rss_mb'] / 1024:6.2f} GiB" if r["peak_rss_mb"] else "      n/a"
        seconds = f"{r['seconds']:7.1f} s" if r["seconds"] is not None else "    n/a"
        print(f"  {r['stage']:<12} {seconds} {memory}   {r['amount'] or ''}  ({r['status']})")
    peak = f"{table['peak_rss_mb'] / 1024:.2f} GiB" if table["peak_rss_mb"] else "n/a"
    print(f"  {'all stages':<12} {table['total_s']:7.1f} s, largest stage peak {peak}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cai benchmarks, side by side (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, pairs and repeats: a few minutes on a CPU")
    parser.add_argument("--model", default="embedded", help="model.path: embedded (default), a folder or a hub id")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--only", choices=("ppo", "rl", "online", "dpo", "generation", "labeling", "engine", "served",
                                           "precision", "pipeline"),
                        action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--trl-dir", type=Path, default=ROOT / "runs" / "bench",
                        help=f"where TRL {TRL_VERSION} (ppo) and {TRL_RL_VERSION} (rl) are installed with --no-deps, "
                             f"in trl-<version>/ (done on first use)")
    parser.add_argument("--pipeline-run", type=Path, default=ROOT / "runs" / "demo",
                        help="the run dir whose per-stage wall time and peak memory are reported (default: make demo's, runs/demo)")
    parser.add_argument("--run-pipeline", action="store_true",
                        help="first run the demo pipeline (python -m cai.pipeline) into --pipeline-run; complete stages there are skipped")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(SERVED_CONCURRENCY),
                        help="served: the served.concurrency values compared, the first the baseline (default: "
                             f"{' '.join(map(str, SERVED_CONCURRENCY))})")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "runs" / "bench" / "bench.json")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: one TRL run in a child process
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    parts = args.only or ["ppo", "rl", "online", "dpo", "generation", "labeling", "engine", "served", "precision",
                          "pipeline"]
    repeats = args.repeats or (2 if args.quick else 3)
    results = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "threads": threads, "quick": args.quick,
               "repeats": repeats}
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a later failure loses nothing measured
        args.output.write_text(json.dumps(results, indent=2) + "\n")

    print(f"cai benchmarks on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs), {threads} torch threads, "
          f"medians of {repeats} alternated runs")
    def sizes(tiny: dict, full: dict, quick: dict):
        """(name, model path, settings, runs per side, work folder suffix) for the tiny models, then ``--model``: its
        steps take tens of seconds, so one alternated pair of runs in --quick."""
        from cai.files import safe_name

        yield "tiny", "tiny-random", tiny, repeats, "tiny"
        yield args.model, args.model, quick if args.quick else full, 1 if args.quick else repeats, safe_name(args.model)

    if "ppo" in parts:
        side = trl_side_folder(args.trl_dir, TRL_VERSION)
        for name, path, settings, n, folder in sizes(PPO_TINY, PPO_EMBEDDED, PPO_EMBEDDED_QUICK):
            r = results.setdefault("ppo", {})[name] = bench_ppo(path, settings, ROOT / "runs" / "bench" / f"ppo-{folder}",
                                                               threads, n, side)
            save()
            print(f"PPO on {name} models ({settings['batch_size']} prompts x up to {settings['response_length']} tokens, "
                  f"{settings['ppo_epochs']} epochs x {settings['num_minibatches']} minibatches, median step after the first, "
                  f"{n} run(s) each): cai {r['samples_per_s']['cai']:.2f} samples/s, TRL {TRL_VERSION} PPOTrainer "
                  f"{r['samples_per_s']['trl']:.2f} samples/s: cai/TRL {r['ratio']:.2f}x")
    if "rl" in parts:
        side = trl_side_folder(args.trl_dir, TRL_RL_VERSION)
        for name, path, settings, n, folder in sizes(RL_TINY, RL_EMBEDDED, RL_EMBEDDED_QUICK):
            r = results.setdefault("rl", {})[name] = bench_rl(path, settings, ROOT / "runs" / "bench" / f"rl-{folder}",
                                                             threads, n, side)
            save()
            print(f"RL on {name} models ({settings['batch_size']} prompts x {settings['k']} responses of up to "
                  f"{settings['response_length']} tokens, {settings['ppo_epochs']} epochs x {settings['num_minibatches']} "
                  f"minibatches, median step after the first, {n} run(s) each):")
            for algorithm, trainer in (("rloo", "RLOOTrainer"), ("grpo", "GRPOTrainer")):
                print(f"  {algorithm}: cai {r['samples_per_s'][f'cai {algorithm}']:.2f} samples/s, TRL {TRL_RL_VERSION} "
                      f"{trainer} {r['samples_per_s'][f'trl {algorithm}']:.2f} samples/s: cai/TRL "
                      f"{r['ratio_vs_trl'][algorithm]:.2f}x")
            print(f"  cai rloo step / cai ppo step at {settings['batch_size'] * settings['k']} responses: "
                  f"{r['rloo_step_vs_ppo_step']:.2f}x")
    if "online" in parts:
        for name, path, settings, n, folder in sizes(ONLINE_TINY, ONLINE_EMBEDDED, ONLINE_EMBEDDED_QUICK):
            # vLLM on the tiny random model says nothing about a real one: transformers only there
            variants = [v for v in ONLINE_VARIANTS if name != "tiny" or "vllm" not in v]
            r = results.setdefault("online", {})[name] = bench_online(path, settings, ROOT / "runs" / "bench" / f"online-{folder}",
                                                                     threads, n, variants)
            save()
            print(f"online DPO on {name} models ({settings['batch_size']} prompts x 2 responses of up to "
                  f"{settings['response_length']} tokens, one optimizer step, median step after the first, {n} run(s) each):")
            for variant in variants:
                sec = r["seconds"][variant]
                print(f"  {variant}: {r['pairs_per_s'][variant]:.2f} pairs/s, step {sec['step']:.2f} s = "
                      + ", ".join(f"{k} {sec[k]:.2f} s" for k in ONLINE_PARTS) + f"; {r['dominant'][variant]} dominates")
    if "dpo" in parts:
        side = trl_for_dpo(args.trl_dir)
        for name, path, settings, n, folder in sizes(DPO_TINY, DPO_EMBEDDED, DPO_EMBEDDED_QUICK):
            r = results.setdefault("dpo", {})[name] = bench_dpo(path, settings, ROOT / "runs" / "bench" / f"dpo-{folder}",
                                                               threads, n, side)
            save()
            print(f"DPO on {name} model ({r['train_pairs']} training pairs x {settings['epochs']} epoch(s), micro-batch "
                  f"{settings['micro_batch_size']} pairs, sigmoid loss, beta {settings['beta']}, {n} run(s) each; the "
                  f"reference pass included): cai {r['pairs_per_s']['cai']:.2f} pairs/s, TRL {TRL_RL_VERSION} DPOTrainer "
                  f"{r['pairs_per_s']['trl']:.2f} pairs/s: cai/TRL {r['ratio']:.2f}x")
            print(f"  peak RSS: cai {r['peak_rss_mb']['cai']:.0f} MiB, TRL {r['peak_rss_mb']['trl']:.0f} MiB; first-step loss "
                  f"(policy moved off its reference, one batch): cai {r['first_loss']['cai']:.6f}, TRL "
                  f"{r['first_loss']['trl']:.6f}, difference {r['first_loss_difference']:.1e}")
            if not r["first_loss_agrees"]:
                raise SystemExit(f"dpo: the first-step losses differ by more than {LOSS_TOLERANCE}: the sides do not "
                                 f"compute the same loss, so their speeds are not comparable")
    from cai.constitution import load_constitution, resolve_constitution_dir
    from cai.data import load_prompts
    from cai.feedback import Pair

    def helpful_pairs(n: int) -> list:
        lines = (ROOT / "cai" / "prompts" / "helpful_pairs.jsonl").read_text().splitlines()[:n]
        return [Pair(f"bench-{i}", [{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
                for i, r in enumerate(map(json.loads, lines))]

    constitution = load_constitution(resolve_constitution_dir("constitutions/default"))
    if {"generation", "labeling"} & set(parts):
        from cai.models import load_policy

        model, tok = load_policy({"path": args.model, "device": "auto", "dtype": "float32", "trust_remote_code": False})
        results["device"] = str(next(model.parameters()).device)
        results["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if "generation" in parts:
        n_prompts, max_new_tokens = (16, 32) if args.quick else (32, 64)
        prompts = [it.messages() for it in load_prompts(None, "prompt", "red_team", n_prompts, 0)]
        g = results["generation"] = bench_generation(model, tok, prompts, max_new_tokens, repeats)
        save()
        print(f"generation on {args.model} ({g['prompts']} prompts x up to {g['max_new_tokens']} greedy tokens, "
              f"{g['tokens']} tokens, same tokens at every batch size: {g['same_tokens']}):")
        for name, rate in g["tokens_per_s"].items():
            print(f"  {name:<9} {rate:8.1f} tokens/s   {g['speedup_vs_batch_1'][name]:.2f}x one-at-a-time")
    if "labeling" in parts:
        pairs = helpful_pairs(8 if args.quick else 24)
        lab = results["labeling"] = bench_labeling(model, tok, constitution, pairs, 2, 16, repeats)
        save()
        print(f"labeling on {args.model} ({lab['pairs']} pairs x {lab['n_principles']} principles x 2 orders = "
              f"{lab['comparisons']} comparisons):")
        for name, rate in lab["comparisons_per_s"].items():
            print(f"  {name:<19} {rate:7.2f} comparisons/s")
        print(f"  one-prefill labeling vs generate-and-parse: {lab['speedup']:.2f}x "
              f"(the naive labeler's answer could not be read in {lab['naive_unparsed']} of {lab['comparisons']}; "
              f"cai reads a probability every time)")
    if "engine" in parts:
        n_prompts, max_new_tokens = (16, 32) if args.quick else (32, 64)
        prompts = [it.messages() for it in load_prompts(None, "prompt", "red_team", n_prompts, 0)]
        e = results["engine"] = bench_engine(args.model, prompts, helpful_pairs(8 if args.quick else 24), constitution,
                                             max_new_tokens, repeats)
        save()
        print(f"engines on {args.model}: start hf {e['start_s']['hf']:.1f} s, vllm {e['start_s']['vllm']:.1f} s; greedy replies "
              f"({e['prompts']} prompts x up to {e['max_new_tokens']} tokens, batch 16) the same tokens on "
              f"{e['same_greedy_replies']} of {e['prompts']}")
        print(f"  generation: hf {e['tokens_per_s']['hf']:.1f} tokens/s, vllm {e['tokens_per_s']['vllm']:.1f} tokens/s: "
              f"vllm/hf {e['generation_vllm_vs_hf']:.2f}x")
        print(f"  labeling ({e['comparisons']} comparisons, few-shot): hf {e['comparisons_per_s']['hf']:.2f}/s, vllm "
              f"{e['comparisons_per_s']['vllm']:.2f}/s: vllm/hf {e['labeling_vllm_vs_hf']:.2f}x (labels differ by at most "
              f"{e['largest_label_difference']:.1e})")
        print(f"  labeling by a local vLLM server (start {e['start_s']['served']:.1f} s): {e['comparisons_per_s']['served']:.2f}/s: "
              f"served/hf {e['served_vs_hf']:.2f}x (labels differ from hf's by at most {e['largest_served_label_difference']:.1e})")
    if "served" in parts:
        from cai.files import safe_name

        # the tiny model of the tests, 2 heads: vLLM's CPU attention takes a head size of 32 or more
        tiny = {"seed": 0, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2}
        cl = results.setdefault("served", {})["client"] = bench_served_client(args.concurrency, repeats)
        save()
        print(f"the served client alone (a stub server answering each request after {cl['latency_s'] * 1000:.0f} ms, "
              f"whatever it holds; {cl['comparisons']} comparisons a call):")
        for c, r in cl["comparisons_per_s"].items():
            print(f"  concurrency {c:>4}: {r:8.1f} comparisons/s   {cl['vs_one_at_a_time'][c]:6.1f}x one at a time "
                  f"(ideal {cl['ideal_per_s'][c]:.0f}/s)")
        for name, path, shape, n_pairs in (("tiny", "tiny-random", tiny, 32), (args.model, args.model, None, 8 if args.quick else 32)):
            pairs = helpful_pairs(n_pairs)
            sv = results.setdefault("served", {})[safe_name(name)] = bench_served(path, shape, pairs, constitution,
                                                                                 args.concurrency, repeats)
            save()
            print(f"served labeling on {name} (a local vLLM server, start {sv['start_s']:.1f} s; {sv['pairs']} pairs x 4 "
                  f"principles x 2 orders = {sv['comparisons']} comparisons a call; labels differ across concurrencies by "
                  f"at most {sv['largest_label_difference']:.1e}):")
            for c, r in sv["comparisons_per_s"].items():
                print(f"  concurrency {c:>4}: {r:8.2f} comparisons/s   {sv['vs_one_at_a_time'][c]:.2f}x one at a time")
    if "precision" in parts:
        prompts = [it.messages() for it in load_prompts(None, "prompt", "red_team", 8, 0)]
        pr = results["precision"] = bench_precision(args.model, prompts, 48, repeats)
        save()
        print(f"precision on {args.model} ({pr['prompts']} prompts, {pr['tokens']} prompt tokens, {pr['max_new_tokens']} greedy "
              f"tokens; this CPU has bf16 instructions: {pr['cpu_has_bf16']}):")
        for kind, ratio in pr["bf16_vs_fp32"].items():
            t = pr["seconds"][kind]
            print(f"  {kind:<17} fp32 {t['float32']:6.2f} s, bf16 {t['bfloat16']:6.2f} s: bf16/fp32 speed {ratio:.2f}x")
        print(f"  the same greedy replies in both: {pr['same_greedy_replies']} of {pr['prompts']}")
    if "pipeline" in parts:
        if args.run_pipeline:
            run_pipeline(args.pipeline_run, threads)
        table = results["pipeline"] = pipeline_table(args.pipeline_run)
        save()
        print_pipeline(table, args.pipeline_run)
    print(f"results -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
