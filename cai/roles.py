"""Model roles: which model plays which part of the recipe.

Each role is a top-level config key holding a model spec like ``model``'s (``path``, ``device``, ``dtype``,
``trust_remote_code``, ``tiny``). A key left null takes its value from the role the role falls back to, and every
chain ends at ``model``: a config that sets only ``model`` runs every role on that one model, as before roles
existed. ``labeler.path=DIR`` alone gives the labeler other weights on the device and dtype of ``model``.

Which stage reads which role, and what each does: docs/configuration.md, "Model roles" (the one table of them).

A stage names the roles it reads in its ``HASH_KEYS``; its config hash covers each role's resolved spec
(``identity``), so changing the judge reruns evaluate only and a sweep over ``labeler.path`` shares every stage
that does not read the labeler. Its manifest records each role's model and ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from cai.errors import StageInputError
from cai.lineage import input_fingerprint

# what a spec's path may name besides a folder or a hub id: the model cai ships (SmolLM2-135M-Instruct, cai.models) and
# a small random model built in-process from the spec's ``tiny`` sizes (tests, debug=tiny)
EMBEDDED = "embedded"
TINY_RANDOM = "tiny-random"
# role -> the role it falls back to (every chain ends at ``model``)
ROLES = {"policy": "model", "reviser": "policy", "sl_start": "policy", "labeler": "model", "pm_backbone": "sl_start",
         "judge": "labeler"}
SPEC_KEYS = ("path", "device", "dtype", "trust_remote_code", "tiny", "engine", "vllm", "served", "function")
# what runs a role's generation and labeling: part of the spec a config writes, checked here with the other keys;
# cai.generation runs hf (transformers), cai.engines runs vllm, served and function (load_generator dispatches on this
# name). ``function`` is a Python function as the labeler or judge (``<role>.function``: {_target_: package.module.fn,
# ...keyword arguments}, called as fn(conversation, reply_a, reply_b) -> P(reply_a is better)): it compares replies
# and generates nothing, so only the roles in FUNCTION_ROLES may be one.
ENGINES = ("hf", "vllm", "served", "function")
FUNCTION = "function"
FUNCTION_ROLES = ("labeler", "judge")
VLLM_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enable_prefix_caching", "cpu_kv_cache_gib",
             "sleep")
VLLM_MEMORY_KEYS = ("gpu_memory_utilization", "sleep")  # where an engine keeps its memory, never what it computes
SERVED_KEYS = ("url", "concurrency", "timeout_s", "retries", "api_key_env")
MERGED = ("tiny", "vllm", "served")  # mappings a role overrides key by key
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def spec(cfg, role: str, at=None, key: str | None = None) -> dict:
    """The full model spec of ``role`` (or of ``model``): the role's non-null keys over the spec of the role it
    falls back to (``tiny`` merged key by key). ``key`` says which config key the path came from, for messages
    ("labeler.path", or "model.path" when the labeler falls back to the model).

    With ``at``, the weights there (a stage's output, or a folder a stage key names: ``key``, None for a stage output)
    loaded with the role's settings (device, dtype, trust_remote_code)."""
    if at is not None:
        return {**spec(cfg, role), "path": str(at), "key": key}
    if role == "model":
        own = _checked(_plain(cfg["model"], "model"), "model")
        if own.get("engine") == FUNCTION:
            raise StageInputError(f"model.engine=function: only the {' and the '.join(FUNCTION_ROLES)} can be a function; "
                                  f"set {FUNCTION_ROLES[0]}.engine=function instead")
        return {**own, "key": "model.path", "role": "model"}
    own = _checked(_plain(cfg.get(role), role), role)
    unknown = sorted(set(own) - set(SPEC_KEYS))
    if unknown:
        raise StageInputError(f"{role}.{unknown[0]}: not a model-role key (a role takes {', '.join(SPEC_KEYS)})")
    merged = spec(cfg, ROLES[role])
    for key, value in own.items():
        if value is None:
            continue
        if key in MERGED and isinstance(value, dict):  # key by key; a null inside keeps the fallback's value
            merged[key] = {**(merged.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        else:
            merged[key] = value
    if own.get("path") is not None:
        merged["key"] = f"{role}.path"
    if own.get("function") is not None:  # the key a message about the function names (a judge may inherit the labeler's)
        merged["function_key"] = f"{role}.function"
    merged["role"] = role  # whose engine settings these are, for messages naming <role>.engine, <role>.vllm
    if merged.get("engine") == FUNCTION:
        if role not in FUNCTION_ROLES:  # (model.engine=function is refused above, so the role set it itself)
            raise StageInputError(f"{role}.engine=function: only the {' and the '.join(FUNCTION_ROLES)} can be a function (they "
                                  f"compare replies; the {role} generates): set {role}.engine=hf")
        if not merged.get("function"):
            raise StageInputError(f"{role}.engine=function needs {role}.function={{_target_: package.module.function, ...}}")
    if role == "pm_backbone":  # a scalar-head model: transformers runs it, whatever engine the roles above it name
        if own.get("engine") not in (None, "hf"):
            raise StageInputError(f"pm_backbone.engine={own['engine']}: the preference model is a scalar-head model that "
                                  f"only transformers runs; leave pm_backbone.engine unset")
        merged["engine"] = "hf"
    return merged


def identity(model_spec: dict) -> dict:
    """What a config hash covers of a role: its resolved spec, without the key it was named by (and without the
    ``tiny`` sizes unless it is a tiny-random model; the engine only when it is not ``hf``, so hashes from before
    engines existed still match, with the ``vllm`` settings only for ``vllm`` and without its memory settings
    (``VLLM_MEMORY_KEYS``), and never a server's address or
    connection settings); a function's only its ``function`` (target and arguments). Two roles of one identity can share
    one loaded model."""
    engine = model_spec.get("engine") or "hf"
    if engine == FUNCTION:
        return {"engine": FUNCTION, "function": model_spec["function"]}
    kept = {k: v for k, v in model_spec.items() if k not in ("key", "role", "served", "function", "function_key")
            and (k != "tiny" or model_spec["path"] == TINY_RANDOM) and (k != "engine" or engine != "hf")
            and (k != "vllm" or engine == "vllm")}
    if isinstance(kept.get("vllm"), dict):
        kept["vllm"] = {k: v for k, v in kept["vllm"].items() if k not in VLLM_MEMORY_KEYS}
    return kept


def fingerprint(model_spec: dict) -> str:
    """Which weights a spec loads, as 16 hex digits: the path (a local folder by its files' sizes and times or its
    stage's lineage, ``lineage.input_fingerprint``) and, for tiny-random, the shape and seed. Device and dtype
    are left out: two roles with one fingerprint are the same model. A function: its target and arguments."""
    if model_spec.get("engine") == FUNCTION:
        blob = json.dumps(identity(model_spec), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    path = str(model_spec["path"])
    local = Path(path).expanduser()
    parts = {"path": str(local.resolve()) if local.exists() else path,
             "files": input_fingerprint(local) if local.exists() else None,
             "tiny": model_spec.get("tiny") if path == TINY_RANDOM else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def label(model_spec: dict) -> str:
    """A short name for reports: the path (a stage's output as ``<stage>/model``), and a tiny-random model's seed
    and vocabulary; a function as ``target(arguments)``."""
    if model_spec.get("engine") == FUNCTION:
        arguments = {k: v for k, v in model_spec["function"].items() if k != "_target_"}
        return f"{model_spec['function']['_target_']}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
    path = str(model_spec["path"])
    if path == TINY_RANDOM:
        tiny = model_spec.get("tiny") or {}
        return f"tiny-random (seed {tiny.get('seed', 0)}, vocab {tiny.get('vocab_size', 512)})"
    local = Path(path).expanduser()
    if (local.parent / "manifest.json").is_file():
        return f"{local.parent.name}/{local.name}"
    return path


def describe(model_spec: dict) -> dict:
    """``{"model": label, "path": ..., "fingerprint": ...}``: what a manifest records of a role (a function: ``function``,
    its target and arguments, instead of a path)."""
    if model_spec.get("engine") == FUNCTION:
        return {"model": label(model_spec), "function": model_spec["function"], "fingerprint": fingerprint(model_spec)}
    return {"model": label(model_spec), "path": str(model_spec["path"]), "fingerprint": fingerprint(model_spec)}


def instantiate_function(function: dict, key: str):
    """The callable ``{_target_: package.module.fn, ...}`` names, its other keys bound as keyword arguments (Hydra's
    ``instantiate`` with ``_partial_``); one that does not import is refused in one line naming ``<key>._target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        return instantiate(OmegaConf.create({**function, "_partial_": True}))
    except InstantiationException as e:
        reason = str(e).splitlines()[0].split(", set env var HYDRA_FULL_ERROR")[0]  # Hydra's hint names no key of ours
        raise StageInputError(f"{key}._target_={function['_target_']!r}: {reason}") from None


def _checked(own: dict, role: str) -> dict:
    """The values a spec sets, checked here so a bad one is refused in one line naming ``<role>.<key>`` before any
    stage starts (role keys are null by default, so the config's type check cannot see them)."""
    checks = {"trust_remote_code": (lambda v: isinstance(v, bool), "true or false"),
              "dtype": (lambda v: v in DTYPES, " | ".join(DTYPES)),
              "device": (lambda v: isinstance(v, str) and bool(DEVICE.match(v)), "auto | cpu | cuda | cuda:N | mps"),
              "path": (lambda v: isinstance(v, str) and bool(v), "a folder, a hub id, embedded or tiny-random"),
              "tiny": (lambda v: isinstance(v, dict), "a mapping of tiny-random sizes"),
              "engine": (lambda v: v in ENGINES, " | ".join(ENGINES)),
              "vllm": (lambda v: isinstance(v, dict) and set(v) <= set(VLLM_KEYS), f"a mapping of {', '.join(VLLM_KEYS)}"),
              "served": (lambda v: isinstance(v, dict) and set(v) <= set(SERVED_KEYS), f"a mapping of {', '.join(SERVED_KEYS)}"),
              "function": (lambda v: isinstance(v, dict) and isinstance(v.get("_target_"), str) and bool(v["_target_"]),
                           "{_target_: package.module.function, ...keyword arguments}")}
    for key, (ok, expected) in checks.items():
        if own.get(key) is not None and not ok(own[key]):
            raise StageInputError(f"{role}.{key} must be {expected}, got {own[key]!r}")
    return own


def _plain(value, role: str) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    if not isinstance(value, dict):
        raise StageInputError(f"{role} must be a model spec ({', '.join(SPEC_KEYS)}), got {value!r}; "
                              f"set {role}.path=... for another model")
    return dict(value)
