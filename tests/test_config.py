"""Every primary config composes (alone and with each group option), and the CLIs print it."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_command
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cai.pipeline import STAGES, overrides_for

PRIMARY = [*STAGES, "label_alignment", "pipeline"]
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in ("model", "constitution", "data", "generation", "deepspeed", "experiment", "debug", "launcher", "logger")
}


def _compose(name: str, overrides: list[str] | None = None, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=name, overrides=overrides or [], return_hydra_config=hydra)


def test_every_group_has_options():
    for group, options in GROUP_OPTIONS.items():
        assert options, f"conf/{group}/ is empty"
    assert {"smollm2_135m", "tiny_random"} <= set(GROUP_OPTIONS["model"])
    assert {"zero0", "zero2", "zero3", "zero3_offload"} <= set(GROUP_OPTIONS["deepspeed"])


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes_and_resolves(name):
    cfg = _compose(name)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.model.path == "embedded"
    assert cfg.run_dir and cfg.seed == 0
    if name in STAGES:
        assert name in cfg, f"{name}.yaml should carry its own section"
        bare = _compose(name, ["~experiment"])  # experiment files may set keys of several stages
        assert not (set(STAGES) - {name}) & set(bare), f"{name}.yaml carries another stage's section"
    if name == "pipeline":
        assert set(STAGES) <= set(cfg) and list(cfg.stages) == list(STAGES)


@pytest.mark.parametrize("group", sorted(GROUP_OPTIONS))
def test_every_group_option_composes_with_every_primary(group):
    for option in GROUP_OPTIONS[group]:
        for name in ["pipeline"] if group == "launcher" else PRIMARY:  # launchers start stages: the pipeline's choice
            cfg = _compose(name, [f"{group}={option}"])
            OmegaConf.resolve(cfg)


def test_debug_tiny_switches_to_tiny_model():
    cfg = _compose("sl_generate", ["debug=tiny"])
    assert cfg.model.path == "tiny-random" and cfg.model.tiny.num_layers == 2
    assert cfg.data.num_red_team <= 8


def test_hydra_settings_are_launcher_safe():
    cfg = _compose("sl_train", ["run_dir=/tmp/x"], hydra=True)
    assert cfg.hydra.job.chdir is False
    for key in ("run", "sweep"):
        raw = OmegaConf.to_container(cfg.hydra[key], resolve=False)
        assert "now:" not in str(raw), f"hydra.{key} must not depend on the clock (ranks must agree)"
    assert cfg.hydra.run.dir.startswith("/tmp/x/")


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="not in struct|Could not override"):
        _compose("sl_generate", ["ppo.kl_coef=0.1"])


@pytest.mark.parametrize("name", PRIMARY)
def test_cfg_job_prints_composed_config(name, capsys):
    """The command (run in this process: ``run_command``) prints its composed config and ends without an error."""
    module = "cai.pipeline" if name == "pipeline" else f"cai.stages.{name}"
    assert run_command(module, "--cfg", "job", "model=tiny_random") is None
    assert re.search(r"^model:\n  path: tiny-random", capsys.readouterr().out, re.M)


def test_pipeline_routes_stage_overrides():
    given = ["model=tiny_random", "ppo.kl_coef=0.1", "sl_train.lr=1e-4", "stages=[ppo]", "run_dir=R"]
    assert overrides_for("ppo", given) == ["model=tiny_random", "ppo.kl_coef=0.1", "run_dir=R"]
    assert overrides_for("sl_train", given) == ["model=tiny_random", "sl_train.lr=1e-4", "run_dir=R"]
