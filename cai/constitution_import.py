"""Convert published constitution formats into a cai constitution folder (``cai constitution import``).

- ``anthropic``: the folder of prompt files released with the Constitutional AI paper —
  ``CritiqueRevisionInstructions.json`` (critique/revision request pairs), ``RLMadisonInstructions.json``
  (comparison principles), and, when present, ``CritiqueRevisionFewShotPrompts.json``,
  ``RLMadisonFewShotPrompts.json`` and ``RLMadisonPrecogFewShotPrompts.json`` (few-shot exemplars,
  the last with chain-of-thought rationales). Their "Human:/Assistant:" transcripts become chat turns.
- ``hf``: one llm-swarm constitution JSON file: ``constitutions`` (``critic``/``revision`` pairs) and
  ``system_chat`` (few-shot chats).

Whatever a format lacks — templates and answer cues always, comparison principles for ``hf`` — is
filled from the default constitution, and the output says so in its header and on stderr.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from cai.constitution import PRINCIPLES_FILE, ConstitutionError, load_constitution, resolve_constitution_dir
from cai.files import atomic_dir

DEFAULT_CONSTITUTION = "constitutions/default"
FORMATS = ("anthropic", "hf")


class ImportFormatError(ValueError):
    """The input does not have the expected shape; the message names the file and what is wrong."""


def import_constitution(source: str | Path, fmt: str, out: str | Path) -> list[str]:
    """Write a constitution folder at ``out`` from ``source``; return notes on what was filled in."""
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise ImportFormatError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.exists() and not out.is_dir():
        raise ImportFormatError(f"{out}: output path exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise ImportFormatError(f"{out}: output folder exists and is not empty; choose another -o or remove it")
    default = load_constitution(resolve_constitution_dir(DEFAULT_CONSTITUTION))
    notes = ["templates (*.j2) and answer_cues copied from the default constitution"]
    if fmt == "anthropic":
        data = _from_anthropic(source, notes)
    else:
        data = _from_hf(source, notes)
    if not data["comparison"]:
        data["comparison"] = [{"id": p.id, "text": p.text, "axis": p.axis} for p in default.comparison]
        notes.append(f"comparison principles copied from the default constitution ({fmt} format has none)")
    data["answer_cues"] = dict(default.answer_cues)
    header = "".join(f"# {line}\n" for line in [
        f"Imported by `cai constitution import {source} --format {fmt}`.", *(f"Note: {n}." for n in notes)])
    with atomic_dir(out) as tmp:
        for template in sorted(default.path.glob("*.j2")):
            shutil.copyfile(template, tmp / template.name)
        (tmp / PRINCIPLES_FILE).write_text(header + _dump_yaml(data), encoding="utf-8")
        try:
            load_constitution(tmp)  # the result must load (and therefore lint) clean before it lands
        except ConstitutionError as e:
            raise ImportFormatError(str(e).replace(str(tmp), str(out))) from None
    return notes


# ---------------------------------------------------------------------------------------------
# Anthropic (Constitutional AI paper prompt files)
# ---------------------------------------------------------------------------------------------

_TRANSCRIPT_SPEAKERS = {
    "Human": "user", "Assistant": "assistant",
    "CritiqueRequest": "user", "Critique": "assistant",
    "RevisionRequest": "user", "Revision": "assistant",
}
_SPEAKER_RE = re.compile(r"\n\n(" + "|".join(_TRANSCRIPT_SPEAKERS) + r"):[ \t]*")


def _from_anthropic(folder: Path, notes: list[str]) -> dict:
    if not folder.is_dir():
        raise ImportFormatError(f"{folder}: the anthropic format is a folder holding CritiqueRevisionInstructions.json")
    instructions = _read_json(folder / "CritiqueRevisionInstructions.json", dict)
    critique_revision = []
    for key, entry in instructions.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), list) or not isinstance(entry.get("edit_request"), str):
            raise ImportFormatError(f"{folder / 'CritiqueRevisionInstructions.json'}: entry {key!r} needs 'prompt' (list) "
                                    f"and 'edit_request'")
        revision = _strip_label(entry["edit_request"], "RevisionRequest", "Revision")
        for i, prompt in enumerate(entry["prompt"]):
            pid = key if len(entry["prompt"]) == 1 else f"{key}-{i}"
            critique_revision.append({"id": pid, "critique": _strip_label(prompt, "CritiqueRequest", "Critique"), "revision": revision})

    comparison = []
    madison = folder / "RLMadisonInstructions.json"
    if madison.exists():
        for i, text in enumerate(_read_json(madison, list)):
            clean = re.sub(r"\s*Options:\s*$", "", str(text)).strip()
            comparison.append({"id": f"madison-{i}", "text": clean})

    few_cr = []
    fs = folder / "CritiqueRevisionFewShotPrompts.json"
    if fs.exists():
        for i, transcript in enumerate(_read_json(fs, list)):
            messages = _parse_transcript(str(transcript), fs, i)
            while messages and messages[-1]["role"] == "user":
                messages.pop()  # the transcripts end with an open "Human:" turn
            few_cr.append({"messages": messages})

    few_cmp = []
    fs = folder / "RLMadisonFewShotPrompts.json"
    if fs.exists():
        for i, ex in enumerate(_read_json(fs, list)):
            if not isinstance(ex, dict) or not ex.get("corrects") or not ex.get("incorrects"):
                raise ImportFormatError(f"{fs}: exemplar {i} needs 'prompt', 'corrects' and 'incorrects'")
            conversation = [m for m in _parse_transcript(ex["prompt"], fs, i) if m["content"]]
            better, worse = ex["corrects"][0].strip(), ex["incorrects"][0].strip()
            # Alternate the position of the better answer so the exemplars teach no position.
            a, b, answer = (better, worse, "A") if i % 2 == 0 else (worse, better, "B")
            few_cmp.append({"conversation": conversation, "response_a": a, "response_b": b, "answer": answer})
    fs = folder / "RLMadisonPrecogFewShotPrompts.json"
    if fs.exists():
        for i, ex in enumerate(_read_json(fs, list)):
            few_cmp.append(_parse_precog(ex.get("prompt", "") if isinstance(ex, dict) else "", fs, i))
    if not comparison:
        notes.append("no RLMadisonInstructions.json found")
    return {"name": folder.name, "description": f"Imported from the Anthropic CAI prompt files in {folder}.",
            "critique_revision": critique_revision, "comparison": comparison,
            "few_shot": {"critique_revision": few_cr, "comparison": few_cmp}}


def _strip_label(text: str, label: str, answer_label: str) -> str:
    """'\\n\\nCritiqueRequest: Ask ...\\n\\nCritique:' -> 'Ask ...'"""
    text = text.strip()
    text = re.sub(rf"^{label}:\s*", "", text)
    text = re.sub(rf"\s*{answer_label}:\s*$", "", text)
    return text.strip()


def _parse_transcript(text: str, file: Path, index: int) -> list[dict]:
    parts = _SPEAKER_RE.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3:
        raise ImportFormatError(f"{file}: exemplar {index} has no 'Human:'/'Assistant:' turns")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _TRANSCRIPT_SPEAKERS[speaker], "content": content.strip()})
    return messages


def _parse_precog(text: str, file: Path, index: int) -> dict:
    """A chain-of-thought exemplar: conversation (H:/A: lines), options in [[[...]]], the rationale
    after "Let's think step by step:", and the answer letter."""
    convo = re.search(r"conversation between[^\n]*:\s*\n\n(.*?)\n\n\{\}\n", text, re.S)
    options = re.findall(r"\(([AB])\) \[\[\[(.*?)\]\]\]", text, re.S)
    rationale = re.search(r"step by step:\s*(.*?)\n\nHuman:", text, re.S)
    answer = re.search(r"answer is: \(([AB])\)", text)
    if not (convo and len(options) == 2 and rationale and answer):
        raise ImportFormatError(f"{file}: exemplar {index} is not in the expected chain-of-thought layout")
    turns = re.split(r"(?:^|\n\n)([HA]):\s*", convo.group(1))
    conversation = [{"role": "user" if who == "H" else "assistant", "content": said.strip()}
                    for who, said in zip(turns[1::2], turns[2::2])]
    return {"conversation": conversation, "response_a": options[0][1].strip(), "response_b": options[1][1].strip(),
            "answer": answer.group(1), "rationale": rationale.group(1).strip()}


# ---------------------------------------------------------------------------------------------
# Hugging Face llm-swarm constitution JSON
# ---------------------------------------------------------------------------------------------

def _from_hf(file: Path, notes: list[str]) -> dict:
    data = _read_json(file, dict)
    pairs = data.get("constitutions")
    if not isinstance(pairs, list) or not pairs:
        raise ImportFormatError(f"{file}: expected a non-empty 'constitutions' list of {{critic, revision}}")
    critique_revision = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not isinstance(pair.get("critic"), str) or not isinstance(pair.get("revision"), str):
            raise ImportFormatError(f"{file}: constitutions[{i}] needs 'critic' and 'revision' text")
        critique_revision.append({"id": f"{file.stem}-{i}", "critique": pair["critic"].strip(), "revision": pair["revision"].strip()})
    few_cr = []
    for i, chat in enumerate(data.get("system_chat") or []):
        if not isinstance(chat, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in chat):
            raise ImportFormatError(f"{file}: system_chat[{i}] must be a list of {{role, content}}")
        few_cr.append({"messages": [{"role": m["role"], "content": m["content"]} for m in chat]})
    return {"name": file.stem, "description": f"Imported from the llm-swarm constitution file {file}.",
            "critique_revision": critique_revision, "comparison": [],
            "few_shot": {"critique_revision": few_cr, "comparison": []}}


# ---------------------------------------------------------------------------------------------

def _read_json(path: Path, expected: type):
    if not path.is_file():
        raise ImportFormatError(f"{path}: file not found (or not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ImportFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImportFormatError(f"{path}: cannot be read as UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(data, expected):
        raise ImportFormatError(f"{path}: expected a JSON {expected.__name__}, found {type(data).__name__}")
    return data


class _BlockDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _dump_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100)
