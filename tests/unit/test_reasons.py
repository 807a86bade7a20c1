"""One vocabulary of reasons (``kiloclaw_operator.reasons``): the operator can write no other (conditions
and Events take a ``Reason``, which mypy holds every caller to), every phase has one, and the README's table
is the module, naming nothing the module lacks."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from kiloclaw_operator import conditions, retained
from kiloclaw_operator.kube import KubeClient
from kiloclaw_operator.lifecycle import Decision
from kiloclaw_operator.models import Phase
from kiloclaw_operator.reasons import Reason, markdown_table, of_phase
from kiloclaw_operator.tenancy import Refusal

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TABLE = re.compile(r"<!-- reasons: generated from [^\n]*-->\n(.*?)\n<!-- reasons: end -->", re.S)
#: "reason `X`", "Event `X`", "Warning `X`" (also plural): wherever the docs name a reason.
NAMED_REASON = re.compile(r"\b(?:[Rr]easons?|Events?|Warnings?)\s+`([A-Za-z]+)`")


@pytest.mark.parametrize(
    ("where", "parameter"),
    [
        (KubeClient.post_event, "reason"),
        (conditions.set_condition, "reason"),
        (conditions.mark_stalled, "reason"),
        (retained.DeleteFailure, "reason"),
        (Refusal, "reason"),
        (Decision, "stall"),
        (Decision, "event"),
    ],
)
def test_every_way_to_write_a_reason_takes_a_member_of_the_vocabulary(where: object, parameter: str) -> None:
    hints = typing.get_type_hints(where.__init__ if isinstance(where, type) else where)  # type: ignore[misc]
    assert Reason in (typing.get_args(hints[parameter]) or (hints[parameter],))


def test_every_phase_is_a_reason_of_its_own() -> None:
    assert [of_phase(phase).value for phase in Phase] == [phase.value for phase in Phase]


def test_every_reason_has_a_meaning_and_a_place() -> None:
    for reason in Reason:
        assert reason.meaning and reason.seen.describe(), reason


def test_the_readme_table_is_the_vocabulary() -> None:
    match = TABLE.search(README)
    assert match, "the README has no generated table of reasons"
    assert match[1] == markdown_table(), (
        "regenerate: python -c 'from kiloclaw_operator.reasons import *; ...'"
    )


def test_the_docs_name_no_reason_the_vocabulary_lacks() -> None:
    docs = [README, *(path.read_text() for path in (ROOT / "deploy").rglob("*.md"))]
    named = {name for text in docs for name in NAMED_REASON.findall(text)}
    assert named, "the pattern finds the README's reasons"
    assert named - {reason.value for reason in Reason} == set()
