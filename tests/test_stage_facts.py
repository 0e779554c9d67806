"""Each stage's facts (``cai.stages``) checked against its code, so they cannot drift apart: the top-level config
keys a stage reads are exactly its ``HASH_KEYS`` (plus settings that never change a result, ``UNHASHED``), and the
stage folders it names are exactly its ``UPSTREAM``. A key read but not hashed would let a changed setting reuse
a stale result (as ``ppo`` once did with ``generation.batch_size``); a key hashed but not read reruns a stage
for nothing."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

from cai import roles
from cai.stages import STAGES, UNHASHED

# methods of the stage handle (cai.stage_folder.StageRun) that load a model role: the position of the role argument
ROLE_READERS = {"upstream_model": 1, "role_model": 0}


def config_reads(fn_or_module, stage: str, seen: set | None = None) -> set[str]:
    """The top-level keys of ``cfg`` that the code of ``fn_or_module`` reads — ``cfg.KEY``, ``cfg["KEY"]``,
    ``cfg[STAGE]``, ``cfg.get("KEY")``, a model role as ``roles.spec(cfg, "ROLE")`` or through the stage handle
    (``stage.upstream_model(..., "ROLE")``, ``stage.role_model("ROLE")``) — following the calls that hand
    ``cfg`` to a function of the cai package."""
    seen = set() if seen is None else seen
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn_or_module)))
    namespace = vars(inspect.getmodule(fn_or_module))
    reads: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_cfg(node.value) and node.attr != "get":
            reads.add(node.attr)
        elif isinstance(node, ast.Subscript) and _is_cfg(node.value):
            key = node.slice
            reads.add(key.value if isinstance(key, ast.Constant) else stage if getattr(key, "id", None) == "STAGE"
                      else f"<computed: {ast.unparse(key)}>")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and _is_cfg(node.func.value):
                reads.add(node.args[0].value)
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ROLE_READERS:
                # the stage handle's stage.upstream_model(STAGE, "ROLE") and stage.role_model("ROLE") read the role
                role = node.args[ROLE_READERS[node.func.attr]]
                reads.add(role.value if isinstance(role, ast.Constant) else "<computed role>")
            elif any(_is_cfg(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                callee = _resolve(node.func, namespace)
                if callee is roles.spec:  # roles.spec(cfg, "labeler") reads the role (and what it falls back to)
                    reads.add(node.args[1].value if isinstance(node.args[1], ast.Constant) else "<computed role>")
                elif callee is not None and callee not in seen and callee.__module__.startswith(("cai.", namespace["__name__"])):
                    seen.add(callee)
                    reads |= config_reads(callee, stage, seen)
    return reads


def _is_cfg(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "cfg"


def _resolve(func, namespace):
    """The function a call names (``name(...)`` or ``module.name(...)``), looked up where the call is written."""
    if isinstance(func, ast.Name):
        found = namespace.get(func.id)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in namespace:
        found = getattr(namespace[func.value.id], func.attr, None)
    else:
        return None
    return found if inspect.isfunction(found) else None


def stage_names_used(module) -> set[str]:
    """Other pipeline stages' names that appear as strings in the stage's code (the folders it reads)."""
    tree = ast.parse(inspect.getsource(module))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in STAGES} - {module.STAGE}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_hashes_exactly_the_config_it_reads(stage):
    module = importlib.import_module(f"cai.stages.{stage}")
    reads = config_reads(module, stage) - set(UNHASHED)
    assert not reads - set(module.HASH_KEYS), f"{stage} reads {sorted(reads - set(module.HASH_KEYS))} without hashing it"
    assert not set(module.HASH_KEYS) - reads, f"{stage} hashes {sorted(set(module.HASH_KEYS) - reads)} without reading it"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_declares_the_stage_folders_it_reads(stage):
    module = importlib.import_module(f"cai.stages.{stage}")
    assert module.STAGE == stage and isinstance(module.MULTI_RANK, bool) and isinstance(module.SHARDED, bool)
    assert module.MULTI_RANK or not module.SHARDED  # a stage's ranks split its shards only where it has ranks
    assert stage_names_used(module) == set(module.UPSTREAM)
    assert all(STAGES.index(u) < STAGES.index(stage) for u in module.UPSTREAM), "an upstream stage runs later"


def _example_stage(cfg):
    s = cfg["ppo"]
    return _example_helper(cfg, s) + cfg.seed


def _example_helper(cfg, s):
    return cfg.generation.batch_size + cfg.get("deterministic", 0) + s.steps + len(roles.spec(cfg, "judge"))


def _example_handle(cfg, stage):
    return stage.upstream_model("sl_train", "sl_start") or stage.role_model("policy")


def test_the_check_sees_a_key_read_in_a_helper():
    """The check itself: ``generation`` read in a helper the stage hands its config to is seen, and so is a role, and
    so are the roles the stage handle loads."""
    assert config_reads(_example_stage, "ppo") == {"ppo", "generation", "seed", "deterministic", "judge"}
    assert config_reads(_example_handle, "ppo") == {"sl_start", "policy"}
