"""Secret masking in text, bytes and log records."""

from __future__ import annotations

import logging

from addons.errors import error_body
from addons.secrets import MASK, Redactor, RedactingFilter

KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"


def test_full_key_masked():
    assert Redactor([KEY]).mask(f"Incorrect API key provided: {KEY}.") == f"Incorrect API key provided: {MASK}."


def test_star_masked_echo_masked():
    echoed = "Incorrect API key provided: sk-proj-********************0123."

    assert Redactor([KEY]).mask(echoed) == f"Incorrect API key provided: {MASK}."


def test_bytes_unchanged_object_when_clean():
    data = b'{"error": {"message": "rate limited"}}'

    assert Redactor([KEY]).mask_bytes(data) is data


def test_bytes_masked():
    assert Redactor([KEY]).mask_bytes(KEY.encode() + b"\xff") == MASK.encode() + b"\xff"


def test_short_values_ignored():
    assert Redactor(["abc"]).mask("abc abc") == "abc abc"


def test_filter_masks_message_and_traceback():
    redactor = Redactor([KEY])
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "calling with %s", (KEY,), sys.exc_info())

    assert RedactingFilter(redactor).filter(record) is True
    assert record.getMessage() == f"calling with {MASK}"
    assert KEY not in record.exc_text
    assert MASK in record.exc_text


def test_error_bodies_per_provider():
    assert error_body("openai", 401, "no", code="invalid_api_key") == {
        "error": {"message": "no", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    }
    assert error_body("anthropic", 401, "no", request_id="th_1") == {
        "type": "error", "error": {"type": "authentication_error", "message": "no"}, "request_id": "th_1",
    }
    assert error_body("anthropic", 413, "big")["error"]["type"] == "request_too_large"
    assert error_body("openai", 502, "down")["error"]["type"] == "server_error"
