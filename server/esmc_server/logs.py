"""The server's log lines, without request content unless asked for.

Sequences are often proprietary. The service's own log lines name counts, codes, methods and
callers, never a sequence; error messages that quote a request (a variant, a bad character)
are logged at DEBUG only. What remains is an unexpected exception's message, which may quote
whatever the failing code was handed: :class:`WithholdContent` keeps its type and traceback
(file, line, function) and withholds its message, unless ``log_request_content`` is set.
"""

from __future__ import annotations

import logging
import traceback

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WITHHELD = "<message withheld: it may quote request content; --log-request-content shows it>"


class WithholdContent(logging.Filter):
    """Replace a record's exception text by its type and frames, without the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = exception_without_message(record.exc_info[1])
            record.exc_info = None
        return True


def exception_without_message(error: BaseException) -> str:
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_tb(error.__traceback__)
    cause = error.__cause__ or error.__context__
    if cause is not None:
        lines.append(f"(caused by {type(cause).__module__}.{type(cause).__qualname__})\n")
    lines.append(f"{type(error).__module__}.{type(error).__qualname__}: {WITHHELD}")
    return "".join(lines)


def configure(level: str, request_content: bool) -> None:
    """Log to stderr at ``level``; exception messages withheld unless ``request_content``."""
    logging.basicConfig(level=level.upper(), format=FORMAT)
    if not request_content:
        for handler in logging.getLogger().handlers:
            handler.addFilter(WithholdContent())
