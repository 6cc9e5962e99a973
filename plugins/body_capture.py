"""Keeps request and response bodies for the log, when the rules enable `logging.bodies`.

Bodies are truncated to `logging.body_max_bytes` and secrets are masked: the real provider keys, the
project keys known from the environment, the credential the calling client presented (which covers
projects stored only as a sha256 digest), and anything shaped like an OpenAI or Anthropic secret key.
"""

from __future__ import annotations

import os
import re

from addons import hookimpl
from addons.rules import Rules
from addons.secrets import MASK, Redactor

# Secret-key shapes of OpenAI (sk-..., sk-proj-...) and Anthropic (sk-ant-...).
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_-]{16,}")

_settings = {"enabled": False, "max_bytes": 0}
_redactor = Redactor()

_STREAM_KEY = "body_capture.stream"


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    _settings["enabled"] = rules.logging.bodies
    _settings["max_bytes"] = rules.logging.body_max_bytes
    secrets = [p.api_key for p in rules.providers.values() if p.api_key]
    secrets += [os.environ.get(p.key_env) for p in rules.projects.values() if p.key_env]
    _redactor.update([s for s in secrets if s])


_PRESENTED_KEY = "body_capture.presented"

# Headers in which clients present their project key; read before key injection replaces them.
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-portkey-api-key")


def mask(data: bytes, presented: tuple[str, ...] = ()) -> str:
    text = data[: _settings["max_bytes"]].decode("utf-8", errors="replace")
    for secret in presented:
        text = text.replace(secret, MASK)
    return _KEY_SHAPE.sub(MASK, _redactor.mask(text))


def presented_secrets(call, flow) -> tuple[str, ...]:
    """Return the credentials the client sent, longest first, skipping values too short to mask safely."""
    values = []
    for name in _CREDENTIAL_HEADERS:
        value = flow.request.headers.get(name, "")
        scheme, _, token = value.partition(" ")
        values.append(token if scheme.lower() == "bearer" else value)
    if call.proxy_credentials:
        values.append(call.proxy_credentials[1])
    return tuple(sorted({v.strip() for v in values if len(v.strip()) >= 8}, key=len, reverse=True))


@hookimpl(tryfirst=True)
def tollhouse_request(call, flow) -> None:
    if _settings["enabled"]:
        presented = presented_secrets(call, flow)
        call.metadata[_PRESENTED_KEY] = presented
        call.request_body = mask(flow.request.content or b"", presented)


@hookimpl
def tollhouse_sse_event(call, event) -> None:
    if not _settings["enabled"]:
        return
    parts = call.metadata.setdefault(_STREAM_KEY, [])
    size = call.metadata.get(_STREAM_KEY + ".size", 0)
    if size < _settings["max_bytes"]:
        parts.append(event.raw)
        call.metadata[_STREAM_KEY + ".size"] = size + len(event.raw)


@hookimpl
def tollhouse_response(call, flow) -> None:
    if not _settings["enabled"]:
        return
    presented = call.metadata.get(_PRESENTED_KEY, ())
    parts = call.metadata.pop(_STREAM_KEY, None)
    if parts is not None:
        call.response_body = mask(b"".join(parts), presented)
    elif flow.response is not None and not flow.response.stream:
        call.response_body = mask(flow.response.content or b"", presented)
