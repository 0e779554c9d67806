"""Prompt sources for the generating stages.

A source is one of:

- ``None`` — cai's built-in set for that kind (``cai/prompts/red_team.jsonl`` or ``helpful.jsonl``);
- a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a folder written by ``save_to_disk``;
- any other string — a ``datasets`` dataset name (loaded with ``load_dataset(name, split="train")``).

The text column (``column``) holds either a plain prompt or an hh-rlhf style transcript
("\\n\\nHuman: … \\n\\nAssistant: …"). Transcripts become a chat: with ``hh_context=first_turn`` only the
first human turn, with ``hh_context=dialogue`` the whole dialogue up to its last human turn (the
assistant answers after that). Each prompt comes back as a ``PromptItem`` with a stable id.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from cai.errors import DataError

BUILTIN = Path(__file__).parent / "prompts"
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]*")


@dataclass(frozen=True)
class PromptItem:
    id: str                    # stable across runs: "<kind>-<index in the source>"
    kind: str                  # red_team | helpful
    conversation: tuple        # ((role, content), ...) ending with a user turn

    @property
    def prompt(self) -> str:
        return self.conversation[-1][1]

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.conversation]


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}]"""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    return turns


def load_prompts(source: str | None, column: str, kind: str, count: int, seed: int,
                 hh_context: str = "first_turn", key: str = "data", held_out: bool = False) -> list[PromptItem]:
    """``count`` prompts of ``kind`` from ``source``, in a seeded random order: the first ``count`` of it,
    or with ``held_out`` the last ``count`` (evaluation prompts, away from the ones training stages take).

    ``key`` is the config key prefix used in error messages (e.g. ``data.red_team_path``).
    """
    if count < 0:
        raise DataError(f"{key}: the number of {kind} prompts must be >= 0, got {count}")
    if count == 0:
        return []
    items = prompt_order(source, column, kind, seed, hh_context)
    if count > len(items):
        where = str(source) if source else str(BUILTIN / f"{kind}.jsonl")
        raise DataError(f"{key}: asked for {count} {kind} prompts but {where} has {len(items)}")
    return items[len(items) - count:] if held_out else items[:count]


def prompt_order(source: str | None, column: str, kind: str, seed: int, hh_context: str = "first_turn") -> list[PromptItem]:
    """Every prompt of ``source`` in the seeded order that all stages draw from."""
    if hh_context not in ("first_turn", "dialogue"):
        raise DataError(f"data.hh_context must be first_turn or dialogue, got {hh_context!r}")
    where = str(source) if source else str(BUILTIN / f"{kind}.jsonl")
    texts = _read_column(source if source else BUILTIN / f"{kind}.jsonl", column, where)
    items = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{where}: row {i} column {column!r} is {type(text).__name__}, not text")
        if not text.strip():
            continue
        if HH_TURN.search("\n\n" + text.lstrip("\n")) and text.lstrip("\n").startswith("Human:"):
            turns = parse_hh_transcript(text)
            users = [j for j, t in enumerate(turns) if t["role"] == "user"]
            if not users:
                raise DataError(f"{where}: row {i} is a transcript with no Human turn")
            turns = turns[: users[0] + 1] if hh_context == "first_turn" else turns[: users[-1] + 1]
            conversation = tuple((t["role"], t["content"]) for t in turns)
        else:
            conversation = (("user", text.strip()),)
        items.append(PromptItem(id=f"{kind}-{i}", kind=kind, conversation=conversation))
    if not items:
        raise DataError(f"{where}: no prompts (empty file or empty {column!r} column)")
    random.Random(f"cai-prompts:{seed}:{kind}").shuffle(items)
    return items


def _read_column(source: str | Path, column: str, where: str) -> list:
    ds = read_table(source, where)
    if column not in ds.column_names:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    return ds[column]


def read_table(source: str | Path, where: str):
    """A ``datasets.Dataset`` from a local file, a ``save_to_disk`` folder (its train split when it has
    several) or a dataset name; ``where`` names the source in errors."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
            if not path.exists():
                raise DataError(f"{where}: file does not exist")
            if path.stat().st_size == 0:
                raise DataError(f"{where}: file is empty")
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif str(source).startswith(("/", ".", "~")):
            raise DataError(f"{where}: no such file or folder")
        else:
            ds = datasets.load_dataset(str(source), split="train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the message to one line
        if path.suffix == ".jsonl":
            _check_jsonl_lines(path, where)  # name the line when one is not a JSON object
        if _saved_without_rows(path):  # datasets cannot load back a dataset of no rows that it saved
            raise DataError(f"{where}: no rows") from None
        from cai.errors import first_line

        raise DataError(f"{where}: could not be read as a dataset ({first_line(e)})") from None
    return ds


def _saved_without_rows(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder of a dataset with no rows (its state lists no data files)."""
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError):
        return False


def jsonl_rows(path: Path, where: str | None = None):
    """``(line number, value)`` for each non-blank line of a JSONL file; a line that is not JSON is a
    DataError naming ``where`` (default: the path) and the line."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where or path}:{n}: invalid JSON ({e.msg})") from None


def _check_jsonl_lines(path: Path, where: str) -> None:
    """Raise a DataError naming the first line of a JSONL file that is not one JSON object."""
    for n, row in jsonl_rows(path, where):
        if not isinstance(row, dict):
            raise DataError(f"{where}:{n}: each line must be a JSON object, got {type(row).__name__}")
