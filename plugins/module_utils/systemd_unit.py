# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Render systemd unit files from data, with systemd's quoting rules.

This file knows systemd syntax only; which keys a program splits into words is the caller's
knowledge, passed in as a ``key_kind`` function returning one of ``RAW``, ``PAIRS`` or ``ARGS``:

``RAW``
    The value is taken literally by the reader (after trimming surrounding whitespace).  It cannot
    be quoted, so a value with leading/trailing whitespace or a trailing backslash (a line
    continuation) cannot be expressed and is rejected.  A list is written as a repeated key.
``PAIRS``
    The reader splits the value into words (``KEY=VALUE`` pairs such as ``Environment=``).  Every
    string is ONE word and is quoted when needed; a dict gives one ``KEY=VALUE`` word per item;
    each word goes on its own line (the reader accumulates them).
``ARGS``
    The value is a command line (``Exec=``, ``PodmanArgs=``, ``ExecStart=``).  A string is written
    as given (command-line syntax); a list of strings is ONE command line whose items are quoted
    as separate words; a list of lists gives one line per inner list.

Percent signs start systemd specifiers (``%h``, ``%t``...).  With ``specifiers=True`` a ``%``
must start a known specifier (write ``%%`` for a literal percent sign); with
``specifiers=False`` every ``%`` is literal and is written as ``%%``.
"""

from __future__ import annotations

import re

RAW = "raw"
PAIRS = "pairs"
ARGS = "args"

# Specifier letters systemd knows (systemd.unit(5), "Specifiers"), plus %% itself.
SPECIFIER_CHARS = frozenset("aAbBCdEfgGhHiIjJlLmMnNopPqsStTuUvVwWyY%")

SECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SAFE_WORD_RE = re.compile(r"^[^\s\"'\\;]+$")


class UnitValueError(ValueError):
    """A section, key or value that cannot be written as a systemd unit."""


def _where(section, key):
    return "[%s] %s" % (section, key) if key else "[%s]" % section


def check_text(value, where):
    """Reject characters no unit file line can carry."""
    for bad, name in (("\x00", "a NUL byte"), ("\n", "a newline"), ("\r", "a carriage return")):
        if bad in value:
            raise UnitValueError(
                "%s: the value %r contains %s, which a systemd unit file cannot express; "
                "give each line as its own list item instead" % (where, value, name)
            )
    for ch in value:
        if ord(ch) < 32 and ch != "\t":
            raise UnitValueError(
                "%s: the value %r contains the control character %r, which a systemd unit file "
                "cannot express" % (where, value, ch)
            )


def apply_specifiers(value, where, specifiers=True):
    """Return ``value`` with ``%`` handled: checked as specifiers, or escaped as literals."""
    if not specifiers:
        return value.replace("%", "%%")
    i = 0
    while i < len(value):
        if value[i] == "%":
            nxt = value[i + 1] if i + 1 < len(value) else ""
            if nxt not in SPECIFIER_CHARS or nxt == "":
                raise UnitValueError(
                    "%s: %r has %r, which is not a systemd specifier; write '%%%%' for a literal "
                    "percent sign, or set specifiers: false to make every '%%' literal"
                    % (where, value, "%" + nxt)
                )
            i += 2
            continue
        i += 1
    return value


def quote_word(word):
    """Quote one word the way systemd's word splitting reads it back unchanged."""
    if word and _SAFE_WORD_RE.match(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    return '"%s"' % escaped


def scalar_text(value, where):
    """Convert a scalar (str, bool, int, float) to its unit-file text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    raise UnitValueError(
        "%s: values must be strings, numbers, booleans, lists or (for KEY=VALUE keys) mappings, "
        "not %s" % (where, type(value).__name__)
    )


def _raw_line(value, where, specifiers):
    text = scalar_text(value, where)
    check_text(text, where)
    if text != text.strip():
        raise UnitValueError(
            "%s: %r has leading or trailing whitespace, which systemd strips from this key; "
            "remove it" % (where, text)
        )
    if text.endswith("\\"):
        raise UnitValueError(
            "%s: %r ends with a backslash, which systemd reads as a line continuation; "
            "this key cannot carry it" % (where, text)
        )
    return apply_specifiers(text, where, specifiers)


def _word(value, where, specifiers):
    text = scalar_text(value, where)
    check_text(text, where)
    return quote_word(apply_specifiers(text, where, specifiers))


def _command_line(value, where, specifiers):
    if isinstance(value, (list, tuple)):
        if not value:
            raise UnitValueError("%s: an empty command line" % where)
        return " ".join(_word(item, where, specifiers) for item in value)
    text = scalar_text(value, where)
    check_text(text, where)
    if text.endswith("\\"):
        raise UnitValueError("%s: %r ends with a backslash (a line continuation)" % (where, text))
    return apply_specifiers(text, where, specifiers)


def value_lines(section, key, value, kind, specifiers=True):
    """Return the list of line values (right of ``=``) for one key."""
    where = _where(section, key)
    if value is None:
        return []
    if kind == PAIRS:
        if isinstance(value, dict):
            out = []
            for k, v in value.items():
                if v is None:
                    continue
                if not isinstance(k, str) or not k or "=" in k or any(c.isspace() for c in k):
                    raise UnitValueError("%s: %r is not a valid variable or label name" % (where, k))
                out.append(_word("%s=%s" % (k, scalar_text(v, where)), where, specifiers))
            return out
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_word(item, where, specifiers) for item in items if item is not None]
    if kind == ARGS:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
            return [_command_line(v, where, specifiers) for v in value]
        return [_command_line(value, where, specifiers)]
    if isinstance(value, dict):
        raise UnitValueError(
            "%s: a mapping is only accepted for KEY=VALUE keys (Environment, Label, Annotation)" % where
        )
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, (list, tuple, dict)):
            raise UnitValueError("%s: list items must be scalars for this key" % where)
        out.append(_raw_line(item, where, specifiers))
    return out


def render(sections, key_kind, section_order=(), header=None, specifiers=True):
    """Render ``{section: {key: value}}`` as unit-file text.

    Sections named in ``section_order`` come first, in that order; the others follow in the order
    given.  Keys keep the order given.  ``header`` lines are written as ``#`` comments.
    """
    if not isinstance(sections, dict):
        raise UnitValueError("sections must be a mapping of section name to a mapping of keys")
    names = [s for s in section_order if s in sections] + [s for s in sections if s not in section_order]
    lines = []
    if header:
        lines.extend("# " + h if h else "#" for h in header)
    for section in names:
        body = sections[section]
        if not isinstance(section, str) or not SECTION_RE.match(section):
            raise UnitValueError("%r is not a valid unit section name" % (section,))
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise UnitValueError("[%s] must be a mapping of keys to values" % section)
        section_lines = []
        for key, value in body.items():
            if not isinstance(key, str) or not KEY_RE.match(key):
                raise UnitValueError("[%s]: %r is not a valid key name" % (section, key))
            for text in value_lines(section, key, value, key_kind(section, key), specifiers):
                section_lines.append("%s=%s" % (key, text))
        if lines:
            lines.append("")
        lines.append("[%s]" % section)
        lines.extend(section_lines)
    return "\n".join(lines) + "\n"
