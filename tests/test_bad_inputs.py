"""Bad inputs across the stages (issue #9), as one table. Every case is refused the same way: one line naming
the file, line or config key, and the stages already in the run directory left byte for byte as they were.

A case starts from a copy of the tiny pipeline run's folders for its stage and the stages upstream of it
(``tiny_run``), writes its bad input under ``tmp_path`` (or damages a copied upstream folder), runs the stage and
compares the run directory's files before and after. Most cases run the stage in this process, as ``run_stage``
would: the config composed with ``compose_cfg`` and the stage's ``run(cfg, handle(run, cfg))``, which must raise
``InputError`` with a one-line message. The cases marked ``cli`` are refused by the command before a stage's ``run``:
Hydra's and ``run_app``'s refusal of an override (an unknown key or group option, a syntax error) and the pipeline's
own checks run the module's ``__main__`` in this process (``command_refuses``: its SystemExit message, the line
Python prints last on stderr with exit 1); the ones that reach ``run_stage`` — its type check of the values, and one
stage ``InputError`` for its ``cai <stage>: <message>`` line — run as their own process (``process``: exit 1, the
last line of stderr, no traceback), since ``run_stage``'s end shuts down the process group this process keeps."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import ROOT, TINY, assert_one_line_error, command_refuses, compose_cfg, copy_stages, outputs, run_module

from cai.errors import InputError
from cai.pipeline import STAGES, facts
from cai.stages import handle

TINY_ARGS = ("debug=tiny", "progress=false")
DEFAULT = ROOT / "constitutions" / "default"
PRINCIPLES = (DEFAULT / "principles.yaml").read_text(encoding="utf-8")


def line_of(needle: str, text: str = PRINCIPLES) -> int:
    """1-based line of the first line of ``text`` that starts with ``needle``."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(needle))


@dataclass(frozen=True)
class Case:
    id: str
    stage: str                     # cai.stages.<stage>, or "pipeline" for cai.pipeline
    args: tuple[str, ...]          # overrides; {tmp} is the test's tmp_path, {run} the run directory
    expect: str                    # in the error's message, or in the last line of stderr ({tmp} and {run} as in args)
    setup: Callable[[Path, Path], None] | None = None  # setup(tmp, run): write or break the input
    copies: tuple[str, ...] | None = None  # the tiny run's stages to start from (default: the stage's own and upstream)
    cli: bool = False              # refused by the command (python -m ...) before the stage's run: run in this process
    process: bool = False          # a cli case that reaches run_stage: run as its own process


# -- setups -----------------------------------------------------------------------------------

def write(name: str, text: str):
    def setup(tmp: Path, run: Path) -> None:
        (tmp / name).write_text(text, encoding="utf-8")
    return setup


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def constitution(name: str, text: str):
    """A copy of the default constitution in {tmp}/c with the file ``name`` replaced by ``text``."""
    def setup(tmp: Path, run: Path) -> None:
        path = shutil.copytree(DEFAULT, tmp / "c") / name
        assert path.exists(), path
        path.write_text(text, encoding="utf-8")
    return setup


def principles(pattern: str, replacement: str) -> str:
    """The default principles.yaml with the first match of ``pattern`` replaced (it must match)."""
    text, n = re.subn(pattern, replacement, PRINCIPLES, count=1, flags=re.M)
    assert n == 1, pattern
    return text


def manifest(stage: str, status: str | None = None, text: str | None = None):
    """Set the status of a copied stage's manifest, or replace the whole file with ``text``."""
    def setup(tmp: Path, run: Path) -> None:
        path = run / stage / "manifest.json"
        if text is not None:
            path.write_text(text)
        else:
            path.write_text(json.dumps({**json.loads(path.read_text()), "status": status}, indent=2) + "\n")
    return setup


def no_chat_template(name: str):
    """A tiny save_pretrained checkpoint in {tmp}/<name> whose tokenizer has no chat template."""
    def setup(tmp: Path, run: Path) -> None:
        from cai.models import load_policy

        model, tok = load_policy(TINY)
        tok.chat_template = None
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        assert not any("chat_template" in p.name for p in (tmp / name).iterdir())
    return setup


PRINCIPLES_FILE = "{tmp}/c/principles.yaml"
HARM_GENERAL = line_of("  - id: harm-general")

CASES = [
    # -- constitutions: templates --------------------------------------------------------------
    Case("jinja-syntax-error", "sl_generate", ("constitution.path={tmp}/c",),
         "{tmp}/c/critique.j2:2: template syntax error: unexpected 'end of print statement'",
         constitution("critique.j2", "{{ principle.critique }}\n{{ round + }}\n")),
    Case("unknown-template-variable", "sl_generate", ("constitution.path={tmp}/c",),
         "{tmp}/c/critique.j2:3: unknown variable 'user_name' (a critique template may use: principle, prompt, response, round)",
         constitution("critique.j2", "{{ principle.critique }}\n\nAs {{ user_name }} asked.\n")),
    Case("undefined-attribute-at-render", "sl_generate", ("constitution.path={tmp}/c",),
         "{tmp}/c/revision.j2:2: undefined value in template: 'cai.constitution.CritiquePrinciple object' has no attribute 'revison'",
         constitution("revision.j2", "Now rewrite it.\n{{ principle.revison }}\n")),
    # -- constitutions: principles -------------------------------------------------------------
    Case("missing-principle-field", "sl_generate", ("constitution.path={tmp}/c",),
         f"{PRINCIPLES_FILE}:{HARM_GENERAL}: critique_revision 'harm-general' has no 'revision' text",
         constitution("principles.yaml", principles(r"^    revision: >-\n(      .*\n)+", ""))),
    Case("missing-comparison-text", "ai_feedback", ("constitution.path={tmp}/c",),
         f"{PRINCIPLES_FILE}:{line_of('  - id: cmp-less-harmful')}: comparison 'cmp-less-harmful' has no 'text' text",
         constitution("principles.yaml", principles(r"^(  - id: cmp-less-harmful\n    axis: harmlessness\n)    text: >-\n(      .*\n)+",
                                                    r"\1"))),
    Case("unknown-comparison-axis", "ai_feedback", ("constitution.path={tmp}/c",),
         f"{PRINCIPLES_FILE}:{line_of('  - id: cmp-less-harmful')}: comparison 'cmp-less-harmful' has axis 'safety' "
         f"(allowed: harmlessness, helpfulness, both)",
         constitution("principles.yaml", principles(r"^(  - id: cmp-less-harmful\n)    axis: harmlessness$", r"\1    axis: safety"))),
    Case("duplicate-principle-id", "sl_generate", ("constitution.path={tmp}/c",),
         f"{PRINCIPLES_FILE}:{line_of('  - id: harm-physical')}: duplicate principle id 'harm-general' "
         f"(first defined on line {HARM_GENERAL})",
         constitution("principles.yaml", principles(r"^  - id: harm-physical$", "  - id: harm-general"))),
    Case("invalid-principles-yaml", "sl_generate", ("constitution.path={tmp}/c",),
         f"{PRINCIPLES_FILE}:{line_of('  cot: ')}: invalid YAML: found character '\\t' that cannot start any token",
         constitution("principles.yaml", principles(r"^  cot: ", "\tcot: "))),
    Case("constitution-folder-missing", "sl_generate", ("constitution.path={tmp}/nowhere",),
         "{tmp}/nowhere:0: constitution folder does not exist"),
    # -- prompt and comparison data ------------------------------------------------------------
    Case("empty-jsonl", "sl_generate", ("data.red_team_path={tmp}/p.jsonl",),
         "{tmp}/p.jsonl: file is empty", write("p.jsonl", "")),
    Case("malformed-jsonl", "sl_generate", ("data.red_team_path={tmp}/p.jsonl",),
         "{tmp}/p.jsonl:3: invalid JSON (Expecting ',' delimiter)",
         write("p.jsonl", jsonl({"prompt": "a"}, {"prompt": "b"}) + '{"prompt": "c"\n' + jsonl({"prompt": "d"}))),
    Case("wrong-column-name", "sl_generate", ("data.helpful_path={tmp}/p.jsonl",),
         "{tmp}/p.jsonl: no column 'prompt' (columns: text)", write("p.jsonl", jsonl({"text": "a"}, {"text": "b"}))),
    Case("non-string-text", "sl_generate", ("data.red_team_path={tmp}/p.jsonl", "data.num_red_team=2"),
         "{tmp}/p.jsonl: row 1 column 'prompt' is int, not text",
         write("p.jsonl", jsonl({"prompt": "a"}, {"prompt": 7}, {"prompt": "c"}))),
    Case("prompt-file-missing", "sl_generate", ("data.helpful_path={tmp}/nowhere.jsonl",),
         "{tmp}/nowhere.jsonl: file does not exist"),
    Case("too-few-prompts", "sl_generate", ("data.red_team_path={tmp}/p.jsonl", "data.num_red_team=5"),
         "data.num_red_team / data.red_team_path: asked for 5 red_team prompts but {tmp}/p.jsonl has 2",
         write("p.jsonl", jsonl({"prompt": "a"}, {"prompt": "b"}))),
    Case("dataset-without-messages", "sl_train", ("sl_train.dataset={run}/ai_feedback/dataset",),
         "{run}/ai_feedback/dataset: no 'messages' column (columns: id, prompt, chosen",
         copies=("sl_generate", "sl_train", "ai_feedback")),
    Case("pairs-file-bad-line", "label_alignment", ("pairs={tmp}/pairs.jsonl",),
         "{tmp}/pairs.jsonl:2: invalid JSON",
         write("pairs.jsonl", jsonl({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"})
               + "{chosen: 1}\n"), copies=("ai_feedback",)),
    # -- counts --------------------------------------------------------------------------------
    Case("negative-prompt-count", "sl_generate", ("data.num_helpful=-1",),
         "data.num_helpful / data.helpful_path: the number of helpful prompts must be >= 0, got -1"),
    Case("zero-micro-batch", "sl_train", ("sl_train.micro_batch_size=0",), "sl_train.micro_batch_size must be > 0, got 0"),
    Case("negative-example-count", "evaluate", ("evaluate.num_examples=-1",), "evaluate.num_examples must be >= 0, got -1"),
    # -- probabilities and fractions -----------------------------------------------------------
    Case("top-p-above-one", "sl_generate", ("generation.top_p=1.5",),
         "need temperature >= 0 and 0 < generation.top_p <= 1, got 0.7, 1.5"),
    Case("cot-clamp-out-of-range", "ai_feedback", ("ai_feedback.cot_clamp=[0.2,1.5]",),
         "ai_feedback.cot_clamp must be [low, high] within [0, 1], got [0.2, 1.5]"),
    Case("negative-human-fraction", "pm_finetune", ("pm_finetune.human_fraction=-0.5",),
         "pm_finetune.human_fraction must be in [0, 1), got -0.5"),
    Case("eval-fraction-above-one", "pm_pretrain", ("pm_pretrain.eval_fraction=1.5",),
         "pm_pretrain.eval_fraction must be in (0, 1), got 1.5"),
    # -- config keys and types (Hydra) ---------------------------------------------------------
    Case("unknown-config-key", "sl_generate", ("sl_generate.num_promptz=3",),
         "cai sl_generate: Could not override 'sl_generate.num_promptz': Key 'num_promptz' is not in struct", cli=True),
    Case("unknown-config-key-in-pipeline", "pipeline", ("ppo.kl_coeff=0.1",),
         "cai.pipeline: Could not override 'ppo.kl_coeff': Key 'kl_coeff' is not in struct", copies=STAGES, cli=True),
    Case("unknown-group-option", "sl_train", ("model=tiny_randm",),
         "Could not find 'model/tiny_randm' (options: smollm2_135m, tiny_random)", cli=True),
    Case("override-syntax-error", "ai_feedback", ("ai_feedback.num_prompts=[1",),
         "cai ai_feedback: ai_feedback.num_prompts=[1: no viable alternative at input '[1'", cli=True),
    Case("string-for-integer", "ai_feedback", ("ai_feedback.num_prompts=abc",),
         "cai ai_feedback: ai_feedback.num_prompts must be an integer, got 'abc'", cli=True, process=True),
    Case("fraction-for-integer", "ppo", ("ppo.steps=2.5",), "cai ppo: ppo.steps must be an integer, got 2.5", cli=True, process=True),
    Case("word-for-boolean", "sl_generate", ("sl_generate.few_shot=maybe",),
         "cai sl_generate: sl_generate.few_shot must be true or false, got 'maybe'", cli=True, process=True),
    Case("text-for-list", "evaluate", ("evaluate.checkpoints=base",), "cai evaluate: evaluate.checkpoints must be a list, got 'base'",
         cli=True, process=True),
    # -- models --------------------------------------------------------------------------------
    Case("model-path-missing", "sl_generate", ("model.path={tmp}/no-model",),
         "model.path='{tmp}/no-model': model folder does not exist"),
    Case("checkpoint-tokenizer-without-chat-template", "evaluate", ("evaluate.checkpoints=[base,{tmp}/plain]",),
         "evaluate.checkpoints='{tmp}/plain': the tokenizer has no chat template", no_chat_template("plain")),
    # -- model roles (cai.roles) ---------------------------------------------------------------
    Case("role-path-missing", "ai_feedback", ("labeler.path={tmp}/no-model",),
         "labeler.path='{tmp}/no-model': model folder does not exist"),
    Case("role-tokenizer-without-chat-template", "evaluate", ("judge.path={tmp}/plain",),
         "judge.path='{tmp}/plain': the tokenizer has no chat template", no_chat_template("plain")),
    Case("role-path-missing-in-pipeline", "pipeline", ("judge.path={tmp}/no-model",),  # refused before the first stage
         "cai.pipeline: judge.path='{tmp}/no-model': model folder does not exist", copies=STAGES, cli=True),
    Case("role-value-of-another-type", "sl_generate", ("reviser.dtype=bf16",),
         "reviser.dtype must be auto | float32 | bfloat16 | float16 | float64, got 'bf16'"),
    Case("unknown-role-key", "sl_train", ("sl_start.pth={tmp}/m",),
         "cai sl_train: Could not override 'sl_start.pth': Key 'pth' is not in struct", cli=True),
    Case("unknown-role-key-added", "pipeline", ("+labeler.pth={tmp}/m",),
         "cai.pipeline: labeler.pth: not a model-role key (a role takes path, device, dtype, trust_remote_code, tiny, "
         "engine, vllm, served, function)", copies=STAGES, cli=True),

    # -- upstream stages -----------------------------------------------------------------------
    Case("upstream-still-running", "sl_train", (),  # a stage's InputError as run_stage prints it
         "cai sl_train: {run}/sl_generate: the sl_generate stage is not complete (status 'running'); rerun it first",
         manifest("sl_generate", status="running"), cli=True, process=True),
    Case("upstream-manifest-damaged", "sl_train", (),
         "{run}/sl_generate/manifest.json: not valid JSON (Unterminated string starting at, line 1)",
         manifest("sl_generate", text='{"stage": "sl_gen')),
    Case("upstream-missing", "pm_finetune", (), "{run}/ai_feedback: no ai_feedback here (no manifest.json); run that stage first",
         copies=("sl_generate", "pm_pretrain")),
    Case("reward-model-stage-failed", "ppo", (),
         "{run}/pm_finetune: the pm_finetune stage is not complete (status 'failed'); rerun it first",
         manifest("pm_finetune", status="failed")),
]


def _with_upstream(stage: str) -> list[str]:
    """``stage`` and every stage upstream of it, upstream first."""
    if stage not in STAGES:
        return []
    found = [s for u in facts(stage).UPSTREAM for s in _with_upstream(u)]
    return list(dict.fromkeys([*found, stage]))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, tiny_run, tmp_path, request):
    run_dir = copy_stages(tiny_run, tmp_path / "run", case.copies or _with_upstream(case.stage))
    if case.setup is not None:
        case.setup(tmp_path, run_dir)
    before = outputs(run_dir)

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{run}", str(run_dir))

    args = [*TINY_ARGS, f"run_dir={run_dir}", *map(fill, case.args)]
    module = "cai.pipeline" if case.stage == "pipeline" else f"cai.stages.{case.stage}"
    if case.process:
        result = run_module(module, *args)
        assert_one_line_error(result, fill(case.expect))
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    elif case.cli:
        message = command_refuses(module, *args)
        assert fill(case.expect) in message, message
    else:  # as run_stage runs it, less its folder lock and its type check (the cli cases' own)
        stage = importlib.import_module(f"cai.stages.{case.stage}")
        if stage.MULTI_RANK:
            request.getfixturevalue("process_group")
        cfg = compose_cfg(case.stage, args)
        with pytest.raises(InputError) as refused:
            stage.run(cfg, handle(stage.run, cfg))
        message = str(refused.value)
        assert fill(case.expect) in message and "\n" not in message, message
    assert outputs(run_dir) == before
