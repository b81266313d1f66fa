"""Errors that mean "the user asked for something that cannot work".

Entry points catch :class:`UsageError`, print its one-line message and exit
with :data:`EXIT_USAGE`, so bad input never ends in a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

EXIT_USAGE = 2
"""Exit code for bad input: config, flags, paths, checkpoints."""


class UsageError(Exception):
    """Bad input that the user can fix; the message is one line saying how."""


class ConfigError(UsageError):
    """A config value that is unknown, of the wrong type, or out of range."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        shown = field if re.fullmatch(r"[\w.]+", field) else repr(field)  # a key of any text stays on one line
        super().__init__(f"{shown}: got {_shown(value)}, expected {allowed}")


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 3, 10, 10, 60, 60


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a container only as deep and long as a line shows (YAML's aliases can make
    one of billions of items from a few hundred bytes, whose whole repr would never end)."""
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        text = _BRIEF.repr(value)
        return text if len(text) <= 80 else text[:60] + "..."
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the nearest valid name, or ''."""
    by_lower = {choice.lower(): choice for choice in choices}  # AdamW is adamw, not adam
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]}?)" if match else ""


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then each error it was raised from or while handling, to the innermost (a loop ends the walk)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (whitespace runs made single spaces), cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def on_one_line(text: str) -> str:
    """``text`` with each character that would break the line or steer the terminal (a newline in a path
    name, an escape sequence) written as its escape, ``\\n``; tabs and all printing text as they are."""
    if _BREAKING.isdisjoint(text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if c in _BREAKING else c for c in text)


_BREAKING = frozenset(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029])) - {"\t"}
"""Control characters (C0, DEL, C1) and Unicode's line and paragraph separators; not the tab."""


def print_error(line: str) -> None:
    """Write one line to stderr in a single write.

    ``print`` writes the text and its newline separately, and stderr is not
    buffered, so two ranks sharing a terminal or a pipe can interleave their
    lines ("...processeserror: ...") even when each is one line.
    """
    try:
        sys.stderr.write(on_one_line(line) + "\n")
        sys.stderr.flush()
    except OSError:  # its terminal hung up (EIO): there is no one to tell
        output_gone(sys.stderr)


def output_gone(stream: TextIO) -> None:
    """After writing to ``stream`` (stdout, stderr) failed (a BrokenPipeError: its reader went away; EIO: its
    terminal hung up; a full disk): send the rest to devnull, what it still buffers too. A run must not die
    because nobody reads its output, nor exit 120 when Python flushes the stream at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
