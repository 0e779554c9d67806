"""The constitution engine: schema checks, sandboxed rendering, seeded sampling, import, CLI."""

from __future__ import annotations

import shutil

import pytest
from conftest import ROOT

from cai.cli import main as cli
from cai.constitution import (
    OPTION_LABELS,
    SAMPLE_CONVERSATION,
    ConstitutionError,
    comparison_messages,
    critique_messages,
    lint_constitution,
    load_constitution,
    revision_messages,
    sample_principles,
    score_messages,
)
from cai.constitution_import import import_constitution

DEFAULT = ROOT / "constitutions" / "default"


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(DEFAULT, dst)
    return dst


def test_default_constitution_is_complete():
    assert lint_constitution(DEFAULT) == []
    c = load_constitution(DEFAULT)
    assert len(c.critique_revision) >= 16 and len(c.comparison) >= 16
    ids = [p.id for p in c.critique_revision] + [p.id for p in c.comparison]
    assert len(ids) == len(set(ids))
    assert c.few_shot_critique_revision and c.few_shot_comparison
    assert len(c.hash) == 64


def test_chats_carry_principle_and_conversation():
    c = load_constitution(DEFAULT)
    p = c.critique_revision[3]
    chat = critique_messages(c, SAMPLE_CONVERSATION, "an answer", p)
    assert chat[-1] == {"role": "user", "content": p.critique}
    assert chat[-2] == {"role": "assistant", "content": "an answer"}
    assert chat[-3] == SAMPLE_CONVERSATION[-1]
    assert len(chat) == 6 * len(c.few_shot_critique_revision) + 3  # exemplars precede
    chat = revision_messages(c, SAMPLE_CONVERSATION, "an answer", p, "a critique")
    assert chat[-2:] == [{"role": "assistant", "content": "a critique"}, {"role": "user", "content": p.revision}]

    q = c.comparison[0]
    chat, prefix = comparison_messages(c, SAMPLE_CONVERSATION, "first reply", "second reply", q)
    last = chat[-1]["content"]
    assert "(A) first reply" in last and "(B) second reply" in last and q.text in last
    assert SAMPLE_CONVERSATION[0]["content"] in last
    assert prefix == c.answer_cues["comparison"]
    # few-shot verdicts use both positions
    verdicts = {m["content"][-2] for m in chat if m["role"] == "assistant"}
    assert verdicts == set(OPTION_LABELS)
    chat, prefix = comparison_messages(c, SAMPLE_CONVERSATION, "x", "y", q, kind="cot")
    assert prefix == c.answer_cues["cot"]
    chat, prefix = score_messages(c, SAMPLE_CONVERSATION, "the reply")
    assert "the reply" in chat[-1]["content"] and "1" in chat[-1]["content"] and prefix == c.answer_cues["score"]
    # the rating has an instruction of its own: no comparison principle is put in front of the one reply
    assert not any(p.text in chat[-1]["content"] for p in c.comparison)
    evasive, prefix = score_messages(c, SAMPLE_CONVERSATION, "the reply", kind="evasive")
    assert "the reply" in evasive[-1]["content"] and "evasive" in evasive[-1]["content"] and evasive != chat
    assert prefix == c.answer_cues["score"]


def test_unknown_template_variable_names_file_and_line(copy, capsys):
    lines = (copy / "critique.j2").read_text().splitlines()
    lines.insert(3, "Also consider {{ mystery_variable }}.")
    (copy / "critique.j2").write_text("\n".join(lines) + "\n")
    problems = lint_constitution(copy)
    assert any(p.file.name == "critique.j2" and p.line == 4 and "mystery_variable" in p.message for p in problems)
    assert cli(["constitution", "lint", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"{copy / 'critique.j2'}:4: unknown variable 'mystery_variable'" in out
    with pytest.raises(ConstitutionError, match="critique.j2:4"):
        load_constitution(copy)


@pytest.mark.parametrize("payload", ["{{ ''.__class__.__mro__ }}", "{{ principle.__class__.__init__.__globals__ }}",
                                     "{{ conversation.__class__.__base__.__subclasses__() }}"])
def test_sandbox_refuses_python_internals(copy, payload):
    (copy / "comparison.j2").write_text((copy / "comparison.j2").read_text() + payload + "\n")
    problems = lint_constitution(copy)
    assert problems and all(p.file.name == "comparison.j2" for p in problems)
    assert any("refused by the template sandbox" in p.message and "unsafe" in p.message for p in problems)


def test_sandbox_has_no_file_access(copy):
    (copy / "score.j2").write_text((copy / "score.j2").read_text() + '{% include "../../../../etc/passwd" %}\n')
    problems = lint_constitution(copy)
    assert problems and problems[0].file.name == "score.j2"


def test_template_syntax_error_has_line(copy):
    (copy / "revision.j2").write_text("line one\n{{ principle.revision }\n")
    problems = lint_constitution(copy)
    assert [(p.file.name, p.line) for p in problems] == [("revision.j2", 2)]
    assert "syntax" in problems[0].message


def test_comparison_template_must_show_options(copy):
    (copy / "comparison.j2").write_text("{{ principle.text }}\n")
    problems = lint_constitution(copy)
    assert any("must use {{ options }}" in p.message for p in problems)


def test_principle_schema_problems_have_lines(copy):
    text = (copy / "principles.yaml").read_text()
    text = text.replace("  - id: harm-physical\n", "  - id: harm-general\n", 1)  # duplicate id
    (copy / "principles.yaml").write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s == "  - id: harm-general" and i > 25)
    problems = lint_constitution(copy)
    assert any(p.line == line and "duplicate principle id 'harm-general'" in p.message for p in problems)

    text = (copy / "principles.yaml").read_text()
    start = text.index("  - id: privacy")
    rev = text.index("    revision:", start)
    end = text.index("  - id:", rev)
    (copy / "principles.yaml").write_text(text[:rev] + text[end:])  # drop privacy's revision request
    problems = lint_constitution(copy)
    assert any("'privacy' has no 'revision' text" in p.message for p in problems)


def test_broken_yaml_and_missing_files(copy, tmp_path):
    (copy / "principles.yaml").write_text("critique_revision: [\n  - id: a\n")
    problems = lint_constitution(copy)
    assert len(problems) == 1 and problems[0].file.name == "principles.yaml" and problems[0].line > 0
    assert lint_constitution(tmp_path / "nope")[0].message == "constitution folder does not exist"
    shutil.copytree(DEFAULT, tmp_path / "d")
    (tmp_path / "d" / "cot.j2").unlink()
    assert [p.message for p in lint_constitution(tmp_path / "d")] == ["missing cot template"]
    (tmp_path / "d" / "cot.j2").write_text((DEFAULT / "cot.j2").read_text())
    (tmp_path / "d" / "evasive.j2").unlink()
    assert [p.message for p in lint_constitution(tmp_path / "d")] == ["missing evasive template"]


def test_comparison_principles_judge_an_axis(copy):
    """evaluate judges red-team pairs under the harmlessness principles and helpful pairs under the helpfulness ones;
    a principle without ``axis`` judges both; an unknown axis is refused at its line."""
    c = load_constitution(DEFAULT)
    harmless, helpful = {p.id for p in c.judging("harmlessness")}, {p.id for p in c.judging("helpfulness")}
    assert "cmp-privacy" in harmless - helpful and "cmp-not-evasive" in helpful - harmless
    assert harmless & helpful == {"cmp-wise-ethical"} and harmless | helpful == {p.id for p in c.comparison}

    text = (copy / "principles.yaml").read_text()
    (copy / "principles.yaml").write_text(text.replace("axis: helpfulness", "axis: harmlessness"))
    only_harm = _without(copy, "cmp-wise-ethical")  # the one principle left for both
    with pytest.raises(ConstitutionError, match="principles.yaml: no comparison principle judges helpfulness"):
        only_harm.judging("helpfulness")
    (copy / "principles.yaml").write_text(text.replace("axis: helpfulness", "axis: helpful", 1))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s == "  - id: cmp-expert-accuracy")
    [problem] = lint_constitution(copy)
    assert problem.line == line and "axis 'helpful' (allowed: harmlessness, helpfulness, both)" in problem.message


def _without(folder, pid: str):
    """The constitution in ``folder`` with comparison principle ``pid`` removed."""
    text = (folder / "principles.yaml").read_text()
    start = text.index(f"  - id: {pid}")
    end = text.find("\n\n", start)
    (folder / "principles.yaml").write_text(text[:start] + text[end + 2:])
    return load_constitution(folder)


def test_the_detailed_preamble_needs_a_template_that_shows_it(copy):
    c = load_constitution(DEFAULT)
    chat, _ = comparison_messages(c, SAMPLE_CONVERSATION, "x", "y", c.comparison[0], kind="cot", preamble="detailed")
    assert chat[-1]["content"].startswith("You are helping to train an AI assistant")
    text = (copy / "comparison.j2").read_text()
    (copy / "comparison.j2").write_text(text.replace('{% if preamble == "detailed" %}{% include "_preamble.j2" %}\n\n{% endif -%}\n', ""))
    mine = load_constitution(copy)
    assert not mine.uses("comparison", "preamble") and mine.uses("cot", "preamble")
    with pytest.raises(ConstitutionError, match=r"comparison.j2: the detailed preamble was asked for but this template never "
                                                r"uses \{\{ preamble \}\}"):
        comparison_messages(mine, SAMPLE_CONVERSATION, "x", "y", mine.comparison[0], preamble="detailed")
    # a broken detailed branch is a lint problem, not a failure in the middle of ai_feedback
    (copy / "comparison.j2").write_text(text.replace('{% include "_preamble.j2" %}', "{{ preamble.nothing }}"))
    assert any("comparison.j2" in str(p) for p in lint_constitution(copy))


def test_unknown_principle_id_is_a_clear_error():
    c = load_constitution(DEFAULT)
    with pytest.raises(ConstitutionError, match="no critique_revision principle 'nope'"):
        c.critique_principle("nope")


def test_sampling_is_seeded_and_order_free():
    ids = [f"p{i}" for i in range(16)]
    first = [sample_principles(ids, 2, seed=7, key=k) for k in range(50)]
    again = [sample_principles(ids, 2, seed=7, key=k) for k in reversed(range(50))][::-1]
    assert first == again  # independent of the order items are drawn in
    other = [sample_principles(ids, 2, seed=8, key=k) for k in range(50)]
    assert first != other
    assert all(len(set(draw)) == 2 for draw in first)  # distinct within an item
    assert len({d[0] for d in first}) > 8  # spread over the principles
    assert len(sample_principles(ids[:2], 5, seed=0, key="x")) == 5
    with pytest.raises(ValueError):
        sample_principles([], 1, seed=0, key=0)


def test_render_cli_prints_prompt(capsys):
    assert cli(["constitution", "render", str(DEFAULT), "--kind", "revision", "--principle", "privacy"]) == 0
    out = capsys.readouterr().out
    c = load_constitution(DEFAULT)
    assert c.critique_principle("privacy").revision in out
    assert cli(["constitution", "render", str(DEFAULT), "--kind", "comparison", "--model", "tiny-random"]) == 0
    out = capsys.readouterr().out
    assert out.count("<|im_start|>user") >= 1 and out.rstrip().endswith(c.answer_cues["comparison"])
    assert cli(["constitution", "render", str(DEFAULT), "--kind", "critique", "--principle", "nope"]) == 1


def test_import_anthropic(shared_data, tmp_path, capsys):
    out = tmp_path / "anthropic"
    notes = import_constitution(shared_data / "anthropic-cai-prompts", "anthropic", out)
    assert any("templates" in n for n in notes)
    c = load_constitution(out)
    assert len(c.critique_revision) == 16 and len(c.comparison) == 16
    assert c.critique_revision[0].critique.startswith("Identify") and not c.critique_revision[0].critique.endswith(":")
    assert not c.comparison[0].text.endswith("Options:")
    assert len(c.few_shot_critique_revision) == 5 and all(ex[-1]["role"] == "assistant" for ex in c.few_shot_critique_revision)
    assert any(ex.get("rationale") for ex in c.few_shot_comparison)
    assert cli(["constitution", "lint", str(out)]) == 0
    assert cli(["constitution", "render", str(out), "--kind", "cot"]) == 0
    capsys.readouterr()


def test_import_hf(shared_data, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["constitution", "import", str(shared_data / "hf-llm-swarm-constitutions" / "constitution_anthropic.json"),
                "--format", "hf", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "comparison principles copied from the default constitution" in err
    c = load_constitution(out)
    assert len(c.critique_revision) == 16 and c.comparison == load_constitution(DEFAULT).comparison
    assert "comparison principles copied" in (out / "principles.yaml").read_text()
    assert cli(["constitution", "render", str(out), "--kind", "critique"]) == 0
    (tmp_path / "a_file").write_text("x")
    assert cli(["constitution", "import", str(shared_data / "hf-llm-swarm-constitutions" / "constitution_grok.json"),
                "--format", "hf", "-o", str(tmp_path / "a_file")]) == 1
    folder = str(shared_data / "hf-llm-swarm-constitutions")
    assert cli(["constitution", "import", folder, "--format", "hf", "-o", str(tmp_path / "x")]) == 1
    # refuses to overwrite
    assert cli(["constitution", "import", str(shared_data / "hf-llm-swarm-constitutions" / "constitution_grok.json"),
                "--format", "hf", "-o", str(out)]) == 1


def test_import_rejects_wrong_shape(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"constitutions": "oops"}')
    with pytest.raises(ValueError, match="bad.json: expected a non-empty 'constitutions' list"):
        import_constitution(bad, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
