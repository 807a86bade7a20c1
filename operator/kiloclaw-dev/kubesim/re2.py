"""Go RE2 regular expressions (OpenAPI ``pattern``, CEL ``matches``/``find``) on Python's ``re``.

The two agree on the usual patterns, with differences that matter for validation:
- RE2's ``$`` (without the ``m`` flag) matches only at the very end of the text; Python's also matches
  before a final newline, so ``^[a-z]{3}$`` would accept ``"iad\\n"``. Here ``$`` becomes ``\\Z``.
- RE2's ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only: patterns compile with ``re.ASCII``.
- RE2 has no lookaround, backreferences, atomic groups or possessive quantifiers: such patterns are
  refused (a CRD carrying one is refused by the API server).
"""

from __future__ import annotations

import functools
import re

_UNSUPPORTED = (
    ("(?=", "invalid or unsupported Perl syntax: `(?=`"),
    ("(?!", "invalid or unsupported Perl syntax: `(?!`"),
    ("(?<=", "invalid named capture: `(?<=`"),
    ("(?<!", "invalid named capture: `(?<!`"),
    ("(?>", "invalid or unsupported Perl syntax: `(?>`"),
    ("(?P=", "invalid named capture: `(?P=`"),
    ("(?#", "invalid or unsupported Perl syntax: `(?#`"),
)


class RE2Error(ValueError):
    """The pattern is not valid RE2; the text follows Go's ``error parsing regexp: ...``."""


def translate(pattern: str) -> str:
    """The Python equivalent of an RE2 pattern; raises :class:`RE2Error` for syntax RE2 refuses."""
    for marker, message in _UNSUPPORTED:
        index = pattern.find(marker)
        if index >= 0 and not _escaped(pattern, index):
            if "named capture" in message:
                message = f"invalid named capture: `{pattern[index:]}`"
            raise RE2Error(f"error parsing regexp: {message}")
    multiline = re.search(r"\(\?[a-zA-Z]*m", pattern) is not None
    out: list[str] = []
    index = 0
    in_class = False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            following = pattern[index + 1]
            if following.isdigit() and following != "0" and not in_class:
                raise RE2Error(f"error parsing regexp: invalid escape sequence: `\\{following}`")
            if following == "z" and not in_class:
                out.append("\\Z")
            elif following == "Z" and not in_class:
                raise RE2Error("error parsing regexp: invalid escape sequence: `\\Z`")
            else:
                out.append(pattern[index : index + 2])
            index += 2
            continue
        if in_class:
            if char == "]" and not _class_start(pattern, index):
                in_class = False
            out.append(char)
        elif char == "[":
            in_class = True
            out.append(char)
        elif char == "$" and not multiline:
            out.append("\\Z")
        elif char in "*+?}" and index + 1 < len(pattern) and pattern[index + 1] == "+":
            raise RE2Error(f"error parsing regexp: invalid nested repetition operator: `{char}+`")
        else:
            out.append(char)
        index += 1
    return "".join(out)


def _escaped(pattern: str, index: int) -> bool:
    backslashes = 0
    while index - backslashes - 1 >= 0 and pattern[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _class_start(pattern: str, index: int) -> bool:
    """A ``]`` right after ``[`` or ``[^`` is a literal member of the class."""
    before = pattern[:index]
    return (before.endswith("[") and not _escaped(pattern, index - 1)) or (
        before.endswith("[^") and not _escaped(pattern, index - 2)
    )


@functools.lru_cache(maxsize=1024)
def compile_re2(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(translate(pattern), re.ASCII)
    except re.error as error:
        raise RE2Error(f"error parsing regexp: {error}") from None


def search(pattern: str, text: str) -> re.Match[str] | None:
    """Go's ``regexp.MatchString`` (unanchored, like OpenAPI ``pattern`` and CEL ``matches``)."""
    return compile_re2(pattern).search(text)


def validation_error(pattern: str) -> str | None:
    """Why the API server refuses this ``pattern`` in a CRD, or None."""
    try:
        compile_re2(pattern)
    except RE2Error as error:
        return str(error)
    return None
