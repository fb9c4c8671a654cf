"""Structured logging: ``text`` (human) or ``json`` (one object per line), and the one way
caller-supplied text is shown in a message or a log line.

Fields passed as ``extra={...}`` appear as ``key=value`` pairs (text) or JSON keys.

The rule: a record is one line, at most :data:`MAX_LINE` characters, that no caller can
forge. A caller's names (options, inputs, losses, parameters) reach messages through
:func:`shown`, :func:`plain` or :func:`field` (escaped, cut to :data:`MAX_NAME`); the
formatters escape what else reaches a line (a newline in a message or an ``extra`` becomes
``\\n``), cut a record to :data:`MAX_LINE`, and in the text format indent every line of a
traceback, so no line of a record can pass for the start of another.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

MAX_LINE = 64 * 1024
"""The longest log line (characters; the JSON format is ASCII, so bytes too): a caller that
sends megabytes of name must not turn them into megabytes of log per call."""
MAX_NAME = 128
"""The most characters of a caller-supplied name a message or log line shows: twice the
longest loss name (64), enough to recognise a typo, short enough that a status message stays
far below gRPC's 16 KiB metadata limit whatever the caller sent."""
_MAX_VALUE = 16 * 1024
"""The most characters of one JSON value (message, extra) before the record is measured."""

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def shown(text: str, limit: int = MAX_NAME) -> str:
    """``text`` quoted as Python's ``repr`` quotes it (a newline or other control character
    becomes its escape), at most ``limit`` characters of it; a longer text says its length.

    >>> shown("mse_loss")
    "'mse_loss'"
    >>> shown("a\\nb")
    "'a\\\\nb'"
    >>> shown("x" * 300, 4)
    "'xxxx'... (300 characters)"
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def plain(name: str) -> str:
    """A caller-supplied name as a message shows it unquoted: as is when it is a plain
    identifier of at most :data:`MAX_NAME` characters (every name lossd knows is one),
    else :func:`shown`.

    >>> plain("PREDICTIONS"), plain("a b")
    ('PREDICTIONS', "'a b'")
    """
    if len(name) <= MAX_NAME and name.isidentifier():
        return name
    return shown(name)


def field(prefix: str, name: str) -> str:
    """The field of a message that names an entry of a map: ``prefix.`` and :func:`plain`.

    >>> field("options", "eps"), field("inputs", "a\\nb")
    ('options.eps', "inputs.'a\\\\nb'")
    """
    return f"{prefix}.{plain(name)}"


def _escaped(text: str) -> str:
    """``text`` with every character that could break a line escaped (``repr``'s escapes)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _safe(text: str, limit: int) -> str:
    """``text`` escaped (:func:`_escaped`) and cut to ``limit`` characters; only the part
    that can be shown is escaped, so a megabyte of text costs what ``limit`` of it costs."""
    out = _escaped(text[:limit])
    if len(text) <= limit and len(out) <= limit:
        return out
    return f"{out[:limit]}... ({len(text)} characters)"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (JSON escapes newlines itself), at most ``MAX_LINE``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _cut(record.getMessage(), _MAX_VALUE),
        }
        out.update({k: _cut(v, _MAX_VALUE) if isinstance(v, str) else v
                    for k, v in _extras(record).items()})
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            out["traceback"] = trace[-_MAX_VALUE:]  # the end says what was raised
        line = json.dumps(out, default=str)
        if len(line) <= MAX_LINE:
            return line
        # Many long values, or a long one of another type: keep the record's head.
        head = {k: out[k] for k in ("ts", "level", "logger")}
        head["msg"] = _cut(out["msg"], MAX_LINE // 8)
        head["truncated"] = len(line)
        return json.dumps(head)


class TextFormatter(logging.Formatter):
    """``time level logger message key=value...`` on one line; a traceback follows on
    lines indented by two spaces."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        limit = MAX_LINE - 64  # room for the "... (N characters)" of a cut line
        head = f"{self.formatTime(record)} {record.levelname} {record.name} " \
               f"{_safe(record.getMessage(), limit)}"
        extras = _extras(record)
        if extras:
            head += " " + " ".join(f"{k}={_safe(str(v), limit)}" for k, v in extras.items())
        lines = [_cut(head, limit)]
        if record.exc_info:
            lines += ["  " + _safe(line, limit)
                      for line in self.formatException(record.exc_info).splitlines()]
        if record.stack_info:
            lines += ["  " + _safe(line, limit)
                      for line in self.formatStack(record.stack_info).splitlines()]
        return "\n".join(lines)


class _Worker(logging.Filter):
    """Adds ``worker=<index>`` to every record of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def configure(level: str = "info", fmt: str = "text", *, worker: int | None = None) -> None:
    """Send lossd's logs to stderr in the chosen format (replaces earlier handlers).

    ``worker``: the worker process index, added to every line (``lossd serve --processes``).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_Worker(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
