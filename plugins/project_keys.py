"""Identifies a call's project by its project key.

A client presents its project key where its SDK already sends an API key (OpenAI: `Authorization:
Bearer`; Anthropic: `x-api-key` or `Authorization: Bearer`; Azure OpenAI: `api-key`), in Portkey's
`x-portkey-api-key` header, or as the password of its proxy URL (`http://PROJECT:KEY@tollhouse:8080`). Keys are compared by their sha256 digest, the only form the rules
file holds.
"""

from __future__ import annotations

import hmac

from addons import hookimpl
from addons.rules import Project, Rules, project_key_digest

_projects_by_digest: dict[str, Project] = {}


@hookimpl
def tollhouse_configure(rules: Rules) -> None:
    _projects_by_digest.clear()
    for project in rules.projects.values():
        if project.key_sha256:
            _projects_by_digest[project.key_sha256] = project


def presented_key(call, flow) -> str | None:
    """Return the project key the client sent.

    The order: proxy credentials, `x-portkey-api-key`, then the SDK's API-key header.
    """
    if call.proxy_credentials:
        return call.proxy_credentials[1]
    headers = flow.request.headers
    if headers.get("x-portkey-api-key", "").strip():
        return headers["x-portkey-api-key"].strip()
    client_format = call.client_format or (call.provider.api_format if call.provider else None)
    if client_format == "anthropic" and headers.get("x-api-key"):
        return headers["x-api-key"]
    if call.provider is not None and call.provider.kind == "azure" and headers.get("api-key"):
        return headers["api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@hookimpl(trylast=True)
def tollhouse_authenticate(call, flow) -> Project | None:
    key = presented_key(call, flow)
    if not key:
        return None
    project = _projects_by_digest.get(project_key_digest(key))
    if project is None:
        return None
    if call.proxy_credentials and not hmac.compare_digest(call.proxy_credentials[0], project.name):
        # The user part of a proxy URL names the project; a key of another project does not match it.
        return None
    return project
