"""Constitutions: principles as data, prompts as sandboxed Jinja templates.

A constitution is a folder (see ``constitutions/default/``) holding

- ``principles.yaml`` — ``critique_revision`` principles (``id``, ``critique``, ``revision``),
  ``comparison`` principles (``id``, ``text``, optional ``axis``: what evaluate judges under them, ``AXES``),
  ``answer_cues`` (the text the assistant turn starts with before we read option or score probabilities) and
  optional ``few_shot`` exemplars;
- six Jinja templates, one per prompt kind (``TEMPLATE_VARIABLES`` lists what each may use):
  ``critique.j2``, ``revision.j2``, ``comparison.j2``, ``cot.j2``, ``score.j2``, ``evasive.j2``.

Templates render in Jinja's immutable sandbox with ``StrictUndefined``: a misspelt variable is an
error, not an empty string, and ``{{ ''.__class__ }}``-style access to Python internals is refused.
Each template renders the text of one *user* turn; the ``*_messages`` functions below assemble the
whole chat (few-shot exemplars, the conversation, the request) that a stage hands to the model.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from cai.errors import InputError
from cai.lineage import tree_hash

PRINCIPLES_FILE = "principles.yaml"
OPTION_LABELS = ("A", "B")
ANSWER_CUE_KEYS = ("comparison", "cot", "cot_answer", "score")
# what a comparison principle judges in evaluate: red-team replies are compared under harmlessness principles, helpful
# replies under helpfulness ones (CAI's two Elo axes); a principle without ``axis`` judges both
AXES = ("harmlessness", "helpfulness", "both")
# the comparison preambles (RLAIF's prompt variants): base, the question alone; detailed, the templates' longer
# description of the rater's task too (a template shows it where it tests ``preamble == "detailed"``)
PREAMBLES = ("base", "detailed")

# kind -> (template file, variables it may use, variables it must use)
TEMPLATE_VARIABLES: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    # principle: {id, critique, revision}; prompt: the user's request; response: the answer under
    # critique (the latest revision after round 1); round: 1-based revision round.
    "critique": ("critique.j2", frozenset({"principle", "prompt", "response", "round"}), frozenset({"principle"})),
    # as critique, plus critique: the critique the model just wrote.
    "revision": ("revision.j2", frozenset({"principle", "prompt", "response", "critique", "round"}), frozenset({"principle"})),
    # principle: {id, text}; conversation: list of {role, content} before the responses;
    # options: list of {label, text} in the order shown; preamble: one of PREAMBLES.
    "comparison": ("comparison.j2", frozenset({"principle", "conversation", "options", "preamble"}),
                   frozenset({"principle", "options"})),
    "cot": ("cot.j2", frozenset({"principle", "conversation", "options", "preamble"}), frozenset({"principle", "options"})),
    # conversation as above; response: the one response to rate 1..10 (no principle: one fixed rating instruction, so
    # a response always gets the same rating).
    "score": ("score.j2", frozenset({"conversation", "response"}), frozenset({"response"})),
    # as score: how much the one response refuses, dodges or deflects instead of engaging, rated 1..10 (evaluate's
    # evasiveness rate).
    "evasive": ("evasive.j2", frozenset({"conversation", "response"}), frozenset({"response"})),
}
KINDS = tuple(TEMPLATE_VARIABLES)

# A sample conversation used by `lint` (every template must render with it) and by `render`.
SAMPLE_CONVERSATION = [
    {"role": "user", "content": "My neighbour's wifi has no guest access. How do I get onto it without them noticing?"}
]
SAMPLE_RESPONSE = "Try the default router passwords printed in the manual for that model, or guess names and birthdays."
SAMPLE_OTHER_RESPONSE = (
    "Using someone's network without permission is not something I can help with, but you could ask them to "
    "share it, or I can suggest cheap ways to get your own connection."
)
SAMPLE_CRITIQUE = "The response helps the user access a network without the owner's consent, which is illegal."


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConstitutionError(InputError):
    """A problem with a constitution folder; the message is one line, ``file:line: message``."""

    def __init__(self, problem: Problem | str):
        super().__init__(str(problem))
        self.problem = problem if isinstance(problem, Problem) else None


@dataclass(frozen=True)
class CritiquePrinciple:
    id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class ComparisonPrinciple:
    id: str
    text: str
    axis: str = "both"  # one of AXES


@dataclass
class Constitution:
    path: Path
    name: str
    description: str
    critique_revision: list[CritiquePrinciple]
    comparison: list[ComparisonPrinciple]
    answer_cues: dict[str, str]
    few_shot_critique_revision: list[list[dict]] = field(default_factory=list)
    few_shot_comparison: list[dict] = field(default_factory=list)
    hash: str = ""
    _env: jinja2.Environment | None = field(default=None, repr=False)
    _variables: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)  # kind -> variables its template uses

    # -- lookup -------------------------------------------------------------------------------
    def critique_principle(self, pid: str) -> CritiquePrinciple:
        for p in self.critique_revision:
            if p.id == pid:
                return p
        known = ", ".join(p.id for p in self.critique_revision)
        raise ConstitutionError(f"{self.path / PRINCIPLES_FILE}: no critique_revision principle {pid!r} (known: {known})")

    def comparison_principle(self, pid: str) -> ComparisonPrinciple:
        for p in self.comparison:
            if p.id == pid:
                return p
        known = ", ".join(p.id for p in self.comparison)
        raise ConstitutionError(f"{self.path / PRINCIPLES_FILE}: no comparison principle {pid!r} (known: {known})")

    def select(self, section: str, ids, key: str) -> list:
        """The ``section`` ("critique_revision" or "comparison") principles named by ``ids`` (config key
        ``key``), or all of them when ``ids`` is None. Unknown ids and an empty list are errors."""
        if ids is None:
            return list(getattr(self, section))
        lookup = self.critique_principle if section == "critique_revision" else self.comparison_principle
        chosen = [lookup(pid) for pid in ids]
        if not chosen:
            raise ConstitutionError(f"{key} is empty: name at least one principle, or null for all")
        return chosen

    def judging(self, axis: str) -> list[ComparisonPrinciple]:
        """The comparison principles that judge ``axis`` ("harmlessness" or "helpfulness"): those tagged with it or
        with neither (``axis: both``, the default)."""
        chosen = [p for p in self.comparison if p.axis in (axis, "both")]
        if not chosen:
            raise ConstitutionError(f"{self.path / PRINCIPLES_FILE}: no comparison principle judges {axis} (give one "
                                    f"'axis: {axis}' or 'axis: both')")
        return chosen

    def uses(self, kind: str, variable: str) -> bool:
        """Whether the ``kind`` template uses ``variable`` (e.g. a comparison template that never reads
        ``preamble`` cannot show the detailed one)."""
        return variable in self._variables.get(kind, frozenset())

    # -- rendering ----------------------------------------------------------------------------
    def render(self, kind: str, **variables: Any) -> str:
        """Render one template; errors come back as ``ConstitutionError('file:line: ...')``."""
        if kind not in TEMPLATE_VARIABLES:
            raise ConstitutionError(f"unknown template kind {kind!r} (kinds: {', '.join(KINDS)})")
        filename = TEMPLATE_VARIABLES[kind][0]
        assert self._env is not None
        try:
            return self._env.get_template(filename).render(**variables).strip()
        except Exception as e:  # a template is user code: any error it raises is reported at its line
            where, line = _template_error_location(e, self.path, filename)
            raise ConstitutionError(Problem(where, line, _describe_jinja_error(e))) from None


# ---------------------------------------------------------------------------------------------
# Building the chats that stages send to the model
# ---------------------------------------------------------------------------------------------

def critique_messages(
    c: Constitution, conversation: list[dict], response: str, principle: CritiquePrinciple, round: int = 1,
    few_shot: bool = True,
) -> list[dict]:
    """Few-shot exemplars (unless ``few_shot=False``), the conversation, the answer under critique,
    then the critique request."""
    request = c.render("critique", principle=principle, prompt=_last_user(conversation), response=response, round=round)
    return [
        *(_flatten(c.few_shot_critique_revision) if few_shot else []),
        *conversation,
        {"role": "assistant", "content": response},
        {"role": "user", "content": request},
    ]


def revision_messages(
    c: Constitution, conversation: list[dict], response: str, principle: CritiquePrinciple, critique: str, round: int = 1,
    few_shot: bool = True,
) -> list[dict]:
    """The critique chat, the model's critique, then the revision request."""
    request = c.render(
        "revision", principle=principle, prompt=_last_user(conversation), response=response, critique=critique, round=round
    )
    return [
        *critique_messages(c, conversation, response, principle, round, few_shot),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": request},
    ]


def comparison_messages(
    c: Constitution, conversation: list[dict], response_a: str, response_b: str, principle: ComparisonPrinciple,
    kind: str = "comparison", few_shot: bool = True, exemplar_principles: Sequence[ComparisonPrinciple] | None = None,
    preamble: str = "base",
) -> tuple[list[dict], str]:
    """The multiple-choice chat and the assistant-turn prefix after which the option label comes.

    Returns ``(messages, assistant_prefix)``: the model sees ``messages`` with the generation prompt,
    then ``assistant_prefix`` (e.g. "The better response is ("), and the next token is read.
    ``kind="cot"`` uses the chain-of-thought template; its prefix opens the reasoning instead.
    Few-shot exemplars are shown as stored (``answer`` says which position is better); a constitution
    should balance A and B answers across them so they teach no position. Each exemplar is asked under
    ``principle`` too, or, with ``exemplar_principles`` (one per exemplar), under its own (CAI drew them
    independently of the query's). ``preamble`` (``PREAMBLES``) is handed to the template: ``detailed`` asks for its
    longer description of the rater's task (RLAIF's detailed preamble), and a template that never reads it is refused.
    """
    if kind not in ("comparison", "cot"):
        raise ValueError(f"kind must be comparison or cot, got {kind!r}")
    if preamble not in PREAMBLES:
        raise ValueError(f"preamble must be one of {', '.join(PREAMBLES)}, got {preamble!r}")
    if preamble != "base" and not c.uses(kind, "preamble"):
        raise ConstitutionError(f"{c.path / TEMPLATE_VARIABLES[kind][0]}: the {preamble} preamble was asked for but this "
                                f"template never uses {{{{ preamble }}}}")
    messages: list[dict] = []
    exemplars = c.few_shot_comparison if few_shot else []
    if exemplar_principles is not None and len(exemplar_principles) < len(exemplars):
        raise ValueError(f"{len(exemplars)} few-shot exemplars but {len(exemplar_principles)} exemplar principles")
    for n, ex in enumerate(exemplars):
        if kind == "cot" and not ex.get("rationale"):
            continue
        shown = _render_options(ex["response_a"], ex["response_b"])
        asked_under = exemplar_principles[n] if exemplar_principles is not None else principle
        messages.append({"role": "user", "content": c.render(kind, principle=asked_under, conversation=ex["conversation"],
                                                             options=shown, preamble=preamble)})
        verdict = f"{c.answer_cues['comparison']}{ex['answer']})"
        if kind == "cot":
            verdict = f"{c.answer_cues['cot']} {ex['rationale']}\n{c.answer_cues['cot_answer']}{ex['answer']})"
        messages.append({"role": "assistant", "content": verdict})
    options = _render_options(response_a, response_b)
    messages.append({"role": "user", "content": c.render(kind, principle=principle, conversation=conversation, options=options,
                                                         preamble=preamble)})
    return messages, c.answer_cues["comparison" if kind == "comparison" else "cot"]


def score_messages(c: Constitution, conversation: list[dict], response: str, kind: str = "score") -> tuple[list[dict], str]:
    """The 1..10 rating chat and the assistant-turn prefix before the rating: ``kind="score"`` (score.j2: direct
    RLAIF's reward, evaluate's harmlessness rating) or ``"evasive"`` (evasive.j2: evaluate's evasiveness rating). Each
    template holds its own fixed instruction, not a comparison principle."""
    if kind not in ("score", "evasive"):
        raise ValueError(f"kind must be score or evasive, got {kind!r}")
    content = c.render(kind, conversation=conversation, response=response)
    return [{"role": "user", "content": content}], c.answer_cues["score"]


def _render_options(response_a: str, response_b: str) -> list[dict]:
    return [{"label": OPTION_LABELS[0], "text": response_a}, {"label": OPTION_LABELS[1], "text": response_b}]


def _last_user(conversation: list[dict]) -> str:
    for m in reversed(conversation):
        if m["role"] == "user":
            return m["content"]
    raise ValueError("conversation has no user turn")


def _flatten(chats: list[list[dict]]) -> list[dict]:
    return [m for chat in chats for m in chat]


# ---------------------------------------------------------------------------------------------
# Seeded principle sampling
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")


def sample_principles(principles: Sequence[T], k: int, seed: int, key: str | int) -> list[T]:
    """Draw ``k`` principles for one item (a prompt, a pair).

    The draw depends only on ``(seed, key)``, never on batching, order or how often the process was
    restarted, so a resumed run draws exactly what an uninterrupted one would. Draws are without
    replacement while ``k <= len(principles)`` (distinct principles for the rounds of one prompt).
    """
    if not principles:
        raise ValueError("no principles to sample from")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rng = random.Random(f"cai-principles:{seed}:{key}")
    pool = list(principles)
    if k <= len(pool):
        return rng.sample(pool, k)
    return [rng.choice(pool) for _ in range(k)]


# ---------------------------------------------------------------------------------------------
# Loading and linting
# ---------------------------------------------------------------------------------------------

def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution folder; raise ``ConstitutionError`` on the first problem."""
    constitution, problems = _load(Path(path))
    if problems:
        more = f" (and {len(problems) - 1} more; run `cai constitution lint {path}`)" if len(problems) > 1 else ""
        raise ConstitutionError(f"{problems[0]}{more}")
    assert constitution is not None
    return constitution


def lint_constitution(path: str | Path) -> list[Problem]:
    """Every problem in a constitution folder: schema, unique ids, and every template rendered."""
    return _load(Path(path))[1]


def resolve_constitution_dir(path: str | Path) -> Path:
    """A constitution folder given as a path: absolute, relative to the working directory, or
    relative to the cai checkout (so ``constitutions/default`` works from anywhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_project = Path(__file__).resolve().parents[1] / p
    return in_project if in_project.exists() else p


def _load(path: Path) -> tuple[Constitution | None, list[Problem]]:
    pfile = path / PRINCIPLES_FILE
    if not path.is_dir():
        return None, [Problem(path, 0, "constitution folder does not exist")]
    if not pfile.exists():
        return None, [Problem(pfile, 0, "missing principles file")]
    try:
        raw = yaml.load(pfile.read_text(encoding="utf-8"), Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        return None, [Problem(pfile, line, f"invalid YAML: {getattr(e, 'problem', e)}")]
    problems: list[Problem] = []
    parsed = _parse_principles(raw, pfile, problems)
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(path)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )
    variables = {}
    for kind in KINDS:
        found, variables[kind] = _check_template(env, path, kind)
        problems.extend(found)
    if problems:
        return None, problems
    c = Constitution(path=path, _env=env, hash=tree_hash(path), _variables=variables, **parsed)
    problems.extend(_check_renders(c))
    return (None, problems) if problems else (c, [])


_TOP_KEYS = {"name", "description", "critique_revision", "comparison", "answer_cues", "few_shot"}


def _parse_principles(raw: Any, pfile: Path, problems: list[Problem]) -> dict:
    def bad(line: int, msg: str) -> None:
        problems.append(Problem(pfile, line, msg))

    out: dict = {"name": pfile.parent.name, "description": "", "critique_revision": [], "comparison": [],
                 "answer_cues": {}, "few_shot_critique_revision": [], "few_shot_comparison": []}
    if not isinstance(raw, dict):
        bad(1, "top level must be a mapping with critique_revision, comparison and answer_cues")
        return out
    for key in raw:
        if key != "__line__" and key not in _TOP_KEYS:
            bad(raw["__line__"], f"unknown key {key!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    out["name"] = str(raw.get("name", out["name"]))
    out["description"] = str(raw.get("description", ""))
    seen: dict[str, int] = {}

    def check_id(item: dict, where: str) -> str | None:
        pid = item.get("id")
        if not isinstance(pid, str) or not pid.strip():
            bad(item["__line__"], f"{where} entry has no 'id'")
            return None
        if pid in seen:
            bad(item["__line__"], f"duplicate principle id {pid!r} (first defined on line {seen[pid]})")
        seen.setdefault(pid, item["__line__"])
        return pid

    def text_field(item: dict, key: str, where: str) -> str | None:
        value = item.get(key)
        if not isinstance(value, str) or not value.strip():
            bad(item["__line__"], f"{where} {item.get('id', '?')!r} has no {key!r} text")
            return None
        return value.strip()

    for section, keys, optional, cls in (("critique_revision", ("critique", "revision"), (), CritiquePrinciple),
                                         ("comparison", ("text",), ("axis",), ComparisonPrinciple)):
        items = raw.get(section)
        if not isinstance(items, list) or not items:
            bad(raw["__line__"], f"'{section}' must be a non-empty list of principles")
            continue
        for item in items:
            if not isinstance(item, dict):
                bad(raw["__line__"], f"every '{section}' entry must be a mapping")
                continue
            for k in item:
                if k not in ("__line__", "id", *keys, *optional):
                    bad(item["__line__"], f"{section} entry has unknown key {k!r} (allowed: id, {', '.join(keys + optional)})")
            pid = check_id(item, section)
            texts = [text_field(item, k, section) for k in keys]
            extra = {k: item[k] for k in optional if k in item}
            if extra.get("axis", "both") not in AXES:
                bad(item["__line__"], f"comparison {pid!r} has axis {extra['axis']!r} (allowed: {', '.join(AXES)})")
                continue
            if pid is not None and all(t is not None for t in texts):
                out[section].append(cls(pid, *texts, **extra))  # type: ignore[arg-type]

    cues = raw.get("answer_cues")
    if not isinstance(cues, dict):
        bad(raw["__line__"], f"'answer_cues' must be a mapping with {', '.join(ANSWER_CUE_KEYS)}")
    else:
        for k in ANSWER_CUE_KEYS:
            if not isinstance(cues.get(k), str) or not cues[k].strip():
                bad(cues["__line__"], f"answer_cues.{k} must be a non-empty string")
        for k in cues:
            if k != "__line__" and k not in ANSWER_CUE_KEYS:
                bad(cues["__line__"], f"unknown answer cue {k!r} (allowed: {', '.join(ANSWER_CUE_KEYS)})")
        out["answer_cues"] = {k: v for k, v in cues.items() if k != "__line__"}

    few = raw.get("few_shot") or {}
    if not isinstance(few, dict):
        bad(raw["__line__"], "'few_shot' must be a mapping with critique_revision and/or comparison lists")
        few = {}
    for ex in few.get("critique_revision") or []:
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        line = ex["__line__"] if isinstance(ex, dict) else few.get("__line__", 0)
        if _check_messages(msgs, line, "few_shot.critique_revision messages", bad):
            if msgs[-1]["role"] != "assistant":
                bad(line, "a few_shot.critique_revision exemplar must end with an assistant turn")
            else:
                out["few_shot_critique_revision"].append(_strip_lines(msgs))
    for ex in few.get("comparison") or []:
        if not isinstance(ex, dict):
            bad(few.get("__line__", 0), "few_shot.comparison entries must be mappings")
            continue
        ok = _check_messages(ex.get("conversation"), ex["__line__"], "few_shot.comparison conversation", bad)
        for k in ("response_a", "response_b"):
            if not isinstance(ex.get(k), str) or not ex[k].strip():
                bad(ex["__line__"], f"few_shot.comparison exemplar needs a non-empty {k!r}")
                ok = False
        if ex.get("answer") not in OPTION_LABELS:
            bad(ex["__line__"], f"few_shot.comparison 'answer' must be one of {', '.join(OPTION_LABELS)}")
            ok = False
        if "rationale" in ex and not isinstance(ex["rationale"], str):
            bad(ex["__line__"], "few_shot.comparison 'rationale' must be text")
            ok = False
        if ok:
            out["few_shot_comparison"].append(_strip_lines(ex))
    return out


def _check_messages(msgs: Any, line: int, where: str, bad) -> bool:
    if not isinstance(msgs, list) or not msgs:
        bad(line, f"{where} must be a non-empty list of {{role, content}}")
        return False
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            bad(m["__line__"] if isinstance(m, dict) else line, f"{where}: each turn needs role (system|user|assistant) and content text")
            return False
    return True


def _strip_lines(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__line__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _check_template(env: jinja2.Environment, folder: Path, kind: str) -> tuple[list[Problem], frozenset[str]]:
    """Static checks: the file exists, parses, and uses only (and at least) its allowed variables. Returns the
    problems and the variables the file itself uses (not those of the partials it includes)."""
    filename, allowed, required = TEMPLATE_VARIABLES[kind]
    tpath = folder / filename
    if not tpath.exists():
        return [Problem(tpath, 0, f"missing {kind} template")], frozenset()
    source = tpath.read_text(encoding="utf-8")
    try:
        ast = env.parse(source, name=filename, filename=str(tpath))
    except jinja2.TemplateSyntaxError as e:
        return [Problem(tpath, e.lineno or 0, f"template syntax error: {e.message}")], frozenset()
    used = jinja2.meta.find_undeclared_variables(ast)
    problems = []
    for name in sorted(used - allowed):
        problems.append(Problem(tpath, _first_line_of_name(env, source, name),
                                f"unknown variable {name!r} (a {kind} template may use: {', '.join(sorted(allowed))})"))
    for name in sorted(required - used):
        problems.append(Problem(tpath, 1, f"the {kind} template must use {{{{ {name} }}}}"))
    return problems, frozenset(used)


def _check_renders(c: Constitution) -> list[Problem]:
    """Render every template, and every principle through it, with the sample conversation."""
    problems: list[Problem] = []

    def attempt(fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except ConstitutionError as e:
            problems.append(e.problem or Problem(c.path, 0, str(e)))

    for p in c.critique_revision:
        attempt(revision_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, p, SAMPLE_CRITIQUE, 1)
        if problems:
            break
    for p in c.comparison:
        attempt(comparison_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, SAMPLE_OTHER_RESPONSE, p)
        attempt(comparison_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, SAMPLE_OTHER_RESPONSE, p, kind="cot")
        if problems:
            break
    for kind in ("comparison", "cot"):  # the detailed preamble's text too, where the template shows one
        if c.uses(kind, "preamble"):
            attempt(comparison_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, SAMPLE_OTHER_RESPONSE, c.comparison[0],
                    kind=kind, preamble="detailed")
    attempt(score_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE)
    attempt(score_messages, c, SAMPLE_CONVERSATION, SAMPLE_RESPONSE, kind="evasive")
    # Deduplicate: one broken template fails every principle the same way.
    return list(dict.fromkeys(problems))


def _first_line_of_name(env: jinja2.Environment, source: str, name: str) -> int:
    for lineno, token, value in env.lex(source):
        if token == "name" and value == name:
            return lineno
    return 1


def _template_error_location(e: Exception, folder: Path, filename: str) -> tuple[Path, int]:
    """The template file and line an error comes from (an included partial names itself)."""
    if isinstance(e, jinja2.TemplateSyntaxError) and e.lineno:
        return Path(e.filename) if e.filename else folder / filename, e.lineno
    # Jinja rewrites tracebacks so that template frames carry the template's file and line;
    # the innermost such frame is where the error is.
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.filename.endswith(".j2") and Path(frame.filename).parent == folder:
            return Path(frame.filename), frame.lineno or 0
    return folder / filename, 0


def _describe_jinja_error(e: Exception) -> str:
    if isinstance(e, SecurityError):
        return f"refused by the template sandbox: {e}"
    if isinstance(e, jinja2.TemplateNotFound):
        return f"included template {e.name!r} not found (includes may only name files inside the constitution folder)"
    if isinstance(e, jinja2.UndefinedError):
        return f"undefined value in template: {e.message}"
    return f"{type(e).__name__}: {e}"


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records each mapping's first line as ``__line__`` (for lint messages)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping
