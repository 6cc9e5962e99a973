"""Log formats of `tollhouse run`: human-readable text lines, or one JSON object per line."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

#: Name of the `LogRecord` attribute with a call's structured fields (`extra=` of the per-call line).
CALL_FIELDS = "tollhouse_call"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time (UTC, ISO 8601), level, logger and message.

    The per-call line adds the call's fields (request_id, project, provider, model, status, tokens,
    cost, latency) at the top level; a traceback goes into `exception`.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, CALL_FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        # The redaction filter (`addons.secrets`) leaves a masked traceback in exc_text.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    """Return the formatter for a `log_format` value, "text" or "json"."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
