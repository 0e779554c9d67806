"""Function labelers for the tests, named by ``labeler.engine=function labeler.function={_target_: tests.labelers.NAME, ...}``."""

from __future__ import annotations


def first_shown(conversation, reply_a, reply_b, *, bias: float = 0.2) -> float:
    """Prefers the shorter reply, plus a pull toward whichever is shown first (a position bias the orders cancel); a bias
    above 0.3 takes it out of [0, 1]."""
    return (0.5 if len(reply_a) == len(reply_b) else 0.7 if len(reply_a) < len(reply_b) else 0.3) + bias


def constant(conversation, reply_a, reply_b, *, value) -> object:
    return value


def two_arguments(conversation, reply_a) -> float:
    return 0.5


def out_of_range_for(conversation, reply_a, reply_b, *, reply: str) -> float:
    """½, except 2 when ``reply_a`` is ``reply``: a function that passes the probe pair and fails on a real one."""
    return 2.0 if reply_a == reply else 0.5
