"""Masking of secrets in text that leaves the gateway: log lines, log rows, error bodies.

The real provider keys must never reach a client or the log, also when an upstream error echoes them.
"""

from __future__ import annotations

import logging
import re

MASK = "[redacted]"

# Keys shorter than this are not masked by value: masking every occurrence of a 3-letter string would
# garble unrelated text. Real provider keys are far longer.
_MIN_SECRET_LENGTH = 8


class Redactor:
    """Replaces known secret values, and the partly masked forms providers echo, with `MASK`."""

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        self._pattern: re.Pattern[str] | None = None
        self.update(secrets)

    def update(self, secrets: list[str] | tuple[str, ...]) -> None:
        values = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)
        if not values:
            self._pattern = None
            return
        alternatives = [re.escape(v) for v in values]
        # OpenAI's 401 echoes a key as its first characters, a run of '*' and its last four characters.
        alternatives += [re.escape(v[:4]) + r"[\w-]*\*{3,}[\w-]*" for v in values]
        self._pattern = re.compile("|".join(alternatives))

    def mask(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def mask_bytes(self, data: bytes) -> bytes:
        if self._pattern is None or not data:
            return data
        text = data.decode("utf-8", errors="surrogateescape")
        masked = self._pattern.sub(MASK, text)
        return data if masked == text else masked.encode("utf-8", errors="surrogateescape")


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record's final message and traceback."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.redactor.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info:
            # Format the traceback now, masked, so that handlers print the cached text.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redactor.mask(text)
            record.exc_info = None
        return True


def install_log_redaction(redactor: Redactor) -> RedactingFilter:
    """Attach the filter to every handler the root logger has now; call it after all handlers exist.

    Filters on a logger do not see records propagated from child loggers, so the filter goes on the
    handlers; `logging.lastResort` is covered as well.
    """
    log_filter = RedactingFilter(redactor)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(log_filter)
    if logging.lastResort is not None:
        logging.lastResort.addFilter(log_filter)
    return log_filter
