"""Shared fixtures: a fake upstream, a real gateway process in front of it, and SDK clients.

All traffic goes to 127.0.0.1 ports that these fixtures start. SDK clients call the providers' public
host names through HTTPS_PROXY; the gateway reroutes those calls to the fake upstream, so nothing
resolves or contacts a real provider host.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from addons.rules import project_key_digest
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import GatewayProcess, start_gateway

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

OPENAI_REAL_KEY = "sk-real-openai-0123456789abcdef0123456789"
ANTHROPIC_REAL_KEY = "sk-ant-real-0123456789abcdef0123456789ab"
ALPHA_KEY = "th-alpha-key-7f3a9c"
BETA_KEY = "th-beta-key-51e0d2"

GATEWAY_ENV = {
    "OPENAI_API_KEY": OPENAI_REAL_KEY,
    "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY,
    "TH_TEST_ALPHA_KEY": ALPHA_KEY,
}


def rules_text(fake_port: int, **overrides: str) -> str:
    """Return a rules file sending both providers to the fake upstream on `fake_port`."""
    text = f"""
    listen: 127.0.0.1:0
    base_url_listen: 127.0.0.1:0
    data_dir: data
    providers:
      openai:
        kind: openai
        base_url: http://127.0.0.1:{fake_port}
        key_env: OPENAI_API_KEY
      anthropic:
        kind: anthropic
        base_url: http://127.0.0.1:{fake_port}
        key_env: ANTHROPIC_API_KEY
    projects:
      alpha:
        key_env: TH_TEST_ALPHA_KEY
      beta:
        key_sha256: {project_key_digest(BETA_KEY)}
    logging:
      flush_interval: 0.2
      bodies: {overrides.pop("bodies", "false")}
    prices:
      tollhouse-test-model:
        input: 1.50
        output: 6.00
    shutdown_grace: 20
    """
    text = textwrap.dedent(text)
    # Tests tunnel to TLS servers of their own on 127.0.0.1, which the default rules block.
    text += textwrap.dedent(overrides.pop("tunnels", "tunnels:\n  blocked_networks: []\n"))
    for extra in overrides.values():
        text += textwrap.dedent(extra)
    return text


@pytest.fixture(scope="session")
def fake() -> FakeUpstream:
    upstream = FakeUpstream().start_in_thread()
    upstream.expected_keys.update(openai=OPENAI_REAL_KEY, anthropic=ANTHROPIC_REAL_KEY)
    yield upstream
    upstream.stop_thread()


@pytest.fixture(scope="session")
def gateway(fake, tmp_path_factory) -> GatewayProcess:
    process = start_gateway(tmp_path_factory.mktemp("gateway"), rules_text(fake.port), GATEWAY_ENV)
    yield process
    process.stop()


@pytest.fixture
def proxy_env(gateway, monkeypatch):
    """Point HTTPS clients created in the test at the gateway, as a container would."""
    return use_gateway(gateway, monkeypatch)


def use_gateway(gateway: GatewayProcess, monkeypatch) -> GatewayProcess:
    monkeypatch.setenv("HTTPS_PROXY", gateway.proxy_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(gateway.ca_cert))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return gateway


def openai_client(key: str = ALPHA_KEY, **kwargs):
    import openai

    return openai.OpenAI(api_key=key, max_retries=0, timeout=20.0, **kwargs)


def anthropic_client(key: str = ALPHA_KEY, **kwargs):
    import anthropic

    return anthropic.Anthropic(api_key=key, max_retries=0, timeout=20.0, **kwargs)
