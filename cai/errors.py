"""The errors cai reports in one line.

``InputError`` is bad input — a config value, a file, a folder, a model or an upstream stage that cannot be used —
and its message names the key, file (and line) or folder. Every stage catches it (``cai.stages.run_stage``),
prints ``cai <stage>: <message>`` and exits 1; stages raise it before they write anything, so earlier outputs stay
as they were. ``StageError`` is a stage that had to stop mid-run (a non-finite loss); its message says where and
which checkpoint survives. Anything else is a bug and keeps its traceback.
"""

import errno


class InputError(ValueError):
    """Bad input; the message is one line naming the key, file or folder and what is wrong with it."""


class StageInputError(InputError):
    """A bad config value or a missing/incomplete upstream stage."""


class DataError(InputError):
    """Bad input data (a prompt file, a pair file, a dataset)."""


class ManifestError(InputError):
    """A ``manifest.json`` that cannot be read (edited or damaged by hand)."""


class ModelLoadError(InputError):
    """A model or tokenizer that could not be loaded."""


class LabelerError(InputError):
    """A labeler that cannot read options from its tokenizer or prompt."""


class StageError(RuntimeError):
    """A stage had to stop; the message says where and what survives."""


class StageBusy(StageError):
    """Another process holds the stage's folder (``stage_folder.hold_stage``); the message names it."""


def first_line(e: BaseException) -> str:
    """An exception as one line for a one-line error message: its message's first line, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def disk_full(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, says the disk (or the quota) is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):  # pyarrow and torch name it in their own exception types
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False
