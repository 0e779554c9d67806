"""Model roles (cai.roles): fallbacks, what a stage's hash covers, what a manifest records, one-line errors."""

from __future__ import annotations

import re

import pytest
from conftest import compose_cfg

from cai import roles
from cai.errors import StageInputError
from cai.stage_folder import config_hash, write_manifest

TINY_ARGS = ["debug=tiny", "progress=false"]


def test_every_role_falls_back_to_model_when_unset():
    cfg = compose_cfg("pipeline", [])
    model = {**roles.identity(roles.spec(cfg, "model"))}
    for role in roles.ROLES:
        spec = roles.spec(cfg, role)
        assert roles.identity(spec) == model and spec["key"] == "model.path", role


def test_a_role_takes_its_own_keys_over_the_chain_it_falls_back_to():
    cfg = compose_cfg("pipeline", [*TINY_ARGS, "policy.path=/models/small", "policy.dtype=bfloat16", "labeler.path=/models/large"])
    policy, reviser, sl_start, pm = (roles.spec(cfg, r) for r in ("policy", "reviser", "sl_start", "pm_backbone"))
    assert policy["path"] == reviser["path"] == sl_start["path"] == pm["path"] == "/models/small"
    assert reviser["dtype"] == "bfloat16" and reviser["key"] == "policy.path"  # from the policy, not from model
    labeler, judge = roles.spec(cfg, "labeler"), roles.spec(cfg, "judge")
    # the labeler's dtype is model's (debug=tiny pins float32), not the policy's bfloat16
    assert labeler["path"] == "/models/large" and labeler["dtype"] == "float32" and labeler["key"] == "labeler.path"
    # debug=tiny gives the judge a tiny block of its own, merged key by key over the labeler's (from model's)
    assert judge["path"] == "/models/large" and judge["tiny"]["seed"] == 2 and judge["tiny"]["hidden_size"] == 64


def test_the_hash_of_a_stage_covers_exactly_the_roles_it_names():
    base = compose_cfg("pipeline", TINY_ARGS)
    judged = compose_cfg("pipeline", [*TINY_ARGS, "judge.path=/models/judge"])
    assert config_hash(base, ("seed", "labeler")) == config_hash(judged, ("seed", "labeler"))
    assert config_hash(base, ("seed", "judge")) != config_hash(judged, ("seed", "judge"))
    # naming the model a role falls back to is the same config as leaving the role unset
    explicit = compose_cfg("pipeline", [*TINY_ARGS, "policy.path=tiny-random", "reviser.dtype=float32"])
    assert config_hash(base, tuple(roles.ROLES)) == config_hash(explicit, tuple(roles.ROLES))
    # a role that falls back to `model` follows it
    other_model = compose_cfg("pipeline", [*TINY_ARGS, "model.tiny.seed=9"])
    assert config_hash(base, ("policy",)) != config_hash(other_model, ("policy",))


def test_an_engine_and_its_settings_fall_back_key_by_key_and_hash_only_where_they_change_the_results():
    base = compose_cfg("pipeline", TINY_ARGS)
    cfg = compose_cfg("pipeline", [*TINY_ARGS, "labeler.engine=vllm", "labeler.vllm.max_model_len=4096",
                                   "model.vllm.cpu_kv_cache_gib=4", "judge.engine=served", "judge.served.url=http://h:1/v1"])
    labeler, judge, policy = roles.spec(cfg, "labeler"), roles.spec(cfg, "judge"), roles.spec(cfg, "policy")
    assert labeler["engine"] == "vllm" and labeler["vllm"]["max_model_len"] == 4096
    assert labeler["vllm"]["cpu_kv_cache_gib"] == 4 and labeler["vllm"]["enable_prefix_caching"] is True  # from model
    assert judge["engine"] == "served" and judge["served"] == {"url": "http://h:1/v1", "concurrency": 256, "timeout_s": 300,
                                                                "retries": 4, "api_key_env": None}
    # the default engine hashes as before engines existed; vLLM's settings only for a role on vLLM; a server's
    # address never (the served model is the role's path)
    assert "engine" not in roles.identity(policy) and "vllm" not in roles.identity(policy)
    assert config_hash(base, ("policy",)) == config_hash(cfg, ("policy",))
    assert config_hash(base, ("labeler",)) != config_hash(cfg, ("labeler",))
    moved = compose_cfg("pipeline", [*TINY_ARGS, "judge.engine=served", "judge.served.url=http://other:2/v1",
                                     "judge.served.api_key_env=CAI_JUDGE_KEY"])  # where it is and how it is reached
    assert config_hash(moved, ("judge",)) == config_hash(cfg, ("judge",))
    # the PM is a scalar-head model: transformers runs it whatever the roles above it name; naming another engine for
    # it, or an unknown engine, is one line naming the key
    everything = compose_cfg("pipeline", [*TINY_ARGS, "model.engine=vllm"])
    assert roles.spec(everything, "pm_backbone")["engine"] == "hf" and roles.spec(everything, "sl_start")["engine"] == "vllm"
    for override, message in (("pm_backbone.engine=vllm", "pm_backbone.engine=vllm: the preference model is a scalar-head "
                                                          "model that only transformers runs; leave pm_backbone.engine unset"),
                              ("labeler.engine=vlm", "labeler.engine must be hf | vllm | served | function, got 'vlm'")):
        with pytest.raises(StageInputError, match=f"^{re.escape(message)}$"):
            roles.spec(compose_cfg("pipeline", [*TINY_ARGS, override]), override.split(".")[0])


def test_a_fingerprint_names_the_weights_not_the_device():
    a = {"path": "tiny-random", "device": "cpu", "dtype": "float32", "tiny": {"seed": 0, "vocab_size": 512}}
    assert roles.fingerprint(a) == roles.fingerprint({**a, "device": "cuda", "dtype": "bfloat16", "key": "judge.path"})
    assert roles.fingerprint(a) != roles.fingerprint({**a, "tiny": {"seed": 1, "vocab_size": 512}})
    assert roles.label(a) == "tiny-random (seed 0, vocab 512)"


def test_a_stage_output_is_labelled_by_its_stage_and_fingerprinted_by_its_lineage(tmp_path):
    cfg = compose_cfg("sl_train", [*TINY_ARGS, f"run_dir={tmp_path}"])
    folder = tmp_path / "sl_train"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    write_manifest(folder, stage="sl_train", cfg=cfg, status="running", hash_keys=("seed", "sl_start"))
    spec = {**roles.spec(cfg, "sl_start"), "path": str(folder / "model")}
    assert roles.label(spec) == "sl_train/model"
    before = roles.fingerprint(spec)
    write_manifest(folder, stage="sl_train", cfg=compose_cfg("sl_train", [*TINY_ARGS, "seed=3"]), status="running",
                   hash_keys=("seed", "sl_start"))
    assert roles.fingerprint(spec) != before  # the stage reran on other settings: other weights


def test_a_manifest_records_the_model_behind_each_role_the_stage_used(tmp_path):
    cfg = compose_cfg("pipeline", TINY_ARGS)
    written = write_manifest(tmp_path, stage="ppo", cfg=cfg, status="running", hash_keys=("seed", "policy", "labeler"),
                             models={"labeler": None, "policy": {**roles.spec(cfg, "policy"), "path": "/x/sl_train/model"}})
    assert set(written["roles"]) == {"policy"} and written["roles"]["policy"]["path"] == "/x/sl_train/model"
    assert written["trust_remote_code"] is False


@pytest.mark.parametrize("role_cfg, message", [
    ({"path": "x", "pth": "y"},
     "labeler.pth: not a model-role key (a role takes path, device, dtype, trust_remote_code, tiny, engine, vllm, served, function)"),
    ("big-model",
     "labeler must be a model spec (path, device, dtype, trust_remote_code, tiny, engine, vllm, served, function), got 'big-model'"),
])
def test_a_malformed_role_is_one_line_naming_its_key(role_cfg, message):
    with pytest.raises(StageInputError, match=re.escape(message)):
        roles.spec({"model": {"path": "tiny-random"}, "labeler": role_cfg}, "labeler")


def test_evaluate_names_each_circular_reading(tmp_path):
    """evaluate.circular_readings, on hand-written manifests: the judge is ai_feedback's labeler; the judge rated PPO's
    responses as its direct-RLAIF reward; the PM score is PPO's own reward. Another judge or PM: no note."""
    import json

    from omegaconf import OmegaConf

    from cai.stages.evaluate import circular_readings

    def manifest(stage: str, **fields) -> None:
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete", **fields}))

    cfg, s = OmegaConf.create({"run_dir": str(tmp_path)}), OmegaConf.create({})
    manifest("ai_feedback", roles={"labeler": {"fingerprint": "L"}})
    manifest("ppo", reward="pm", reward_fingerprint="P", roles={})
    assert circular_readings(cfg, "J", "Q", ["base", "ppo"], s=s) == []
    judge, pm = circular_readings(cfg, "L", "P", ["base", "ppo"], s=s)
    assert judge.startswith("The judge is the model that labeled ai_feedback's pairs")
    assert pm.startswith("The PM score is read with the PM that PPO optimised") and "evaluate.reward_model" in pm
    assert circular_readings(cfg, "J", "P", ["base", "sl_train"], s=s) == []  # no ppo checkpoint among them
    manifest("dpo", config={"dpo": {"pairs": "ai_feedback"}})  # DPO trained on the labeler's pairs themselves
    assert circular_readings(cfg, "L", None, ["base", "dpo"], s=s)[0].startswith(
        "The judge is the model that labeled ai_feedback's pairs, which trained the PM (and through it the RL policy), "
        "and the dpo checkpoint directly:")
    assert "dpo checkpoint" not in circular_readings(cfg, "L", None, ["base", "ppo"], s=s)[0]
    manifest("ppo", reward="direct_rlaif", reward_fingerprint="direct_rlaif:c", roles={"labeler": {"fingerprint": "L"}})
    assert [n.split(":")[0] for n in circular_readings(cfg, "L", "P", ["ppo"], s=s)] == [
        "The judge is the model that labeled ai_feedback's pairs, which trained the PM (and through it the RL policy)",
        "The judge is the labeler whose direct 1-10 ratings were the RL stage's reward"]
    # another judge still reads the rating question the RL reward was: said too
    assert [n.split(":")[0] for n in circular_readings(cfg, "J", "P", ["ppo"], s=s)] == [
        "The harmlessness rating asks the judge the constitution's rating question (score.j2), the one whose answers were "
        "the RL stage's direct-RLAIF reward"]
    manifest("ppo", reward="pairwise", reward_fingerprint="pairwise:1:c", roles={"labeler": {"fingerprint": "L"}})
    assert circular_readings(cfg, "L", "P", ["ppo"], s=s)[1].startswith(
        "The judge is the labeler whose pairwise comparisons were the RL stage's reward")


@pytest.mark.parametrize("override, message", [
    ("judge.trust_remote_code=no", "judge.trust_remote_code must be true or false, got 'no'"),
    ("labeler.dtype=bf16", "labeler.dtype must be auto | float32 | bfloat16 | float16 | float64, got 'bf16'"),
    ("policy.device=gpu", "policy.device must be auto | cpu | cuda | cuda:N | mps, got 'gpu'"),
])
def test_a_bad_role_value_is_one_line_naming_its_key(override, message):
    cfg = compose_cfg("pipeline", [*TINY_ARGS, override])
    with pytest.raises(StageInputError, match=re.escape(message)):
        config_hash(cfg, tuple(roles.ROLES))
