"""`tollhouse demo`: a first look without provider accounts.

Starts the fake OpenAI/Anthropic upstream and a gateway on loopback ports, sends a few calls with the
official SDKs through HTTPS_PROXY (as a project container would), and prints the cost table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from addons.costs import format_report, spend_report
from addons.testing.fake_upstream import FakeUpstream
from addons.testing.gateway_process import start_gateway

_DEMO_OPENAI_KEY = "sk-demo-real-openai-key-000000000000"
_DEMO_ANTHROPIC_KEY = "sk-ant-demo-real-anthropic-key-0000"
_DEMO_PROJECT_KEY = "demo-project-key"

# Token counts the fake provider reports for each demo call (its `x-fake-usage` header), in each
# provider's own field names, so that the cost table shows cache reads and writes.
_USAGE = {
    "openai-chat": '{"prompt_tokens": 1200, "completion_tokens": 150, "prompt_tokens_details": {"cached_tokens": 1024}}',
    "openai-stream": '{"prompt_tokens": 3000, "completion_tokens": 400}',
    "anthropic-message": '{"input_tokens": 50, "cache_read_input_tokens": 4000, "cache_creation_input_tokens": 1000, "output_tokens": 300}',
    "anthropic-stream": '{"input_tokens": 800, "output_tokens": 120}',
}

_RULES = """\
listen: 127.0.0.1:0
base_url_listen: 127.0.0.1:0
data_dir: data
providers:
  openai:
    kind: openai
    base_url: {base_url}
    key_env: OPENAI_API_KEY
  anthropic:
    kind: anthropic
    base_url: {base_url}
    key_env: ANTHROPIC_API_KEY
projects:
  demo:
    key_env: TOLLHOUSE_DEMO_KEY
logging:
  flush_interval: 0.2
"""


def run_demo(keep: Path | None = None) -> int:
    try:
        import anthropic
        import openai
    except ImportError:
        print("tollhouse demo needs the SDKs: pip install -e '.[test]' (scripts/test installs them)")
        return 1

    workdir = keep or Path(tempfile.mkdtemp(prefix="tollhouse-demo-"))
    upstream = FakeUpstream().start_in_thread()
    upstream.expected_keys.update(openai=_DEMO_OPENAI_KEY, anthropic=_DEMO_ANTHROPIC_KEY)
    gateway = start_gateway(
        workdir,
        _RULES.format(base_url=upstream.base_url),
        {"OPENAI_API_KEY": _DEMO_OPENAI_KEY, "ANTHROPIC_API_KEY": _DEMO_ANTHROPIC_KEY, "TOLLHOUSE_DEMO_KEY": _DEMO_PROJECT_KEY},
    )
    saved = {name: os.environ.get(name) for name in ("HTTPS_PROXY", "SSL_CERT_FILE", "NO_PROXY", "no_proxy")}
    try:
        os.environ["HTTPS_PROXY"] = gateway.proxy_url
        os.environ["SSL_CERT_FILE"] = str(gateway.ca_cert)
        os.environ.pop("NO_PROXY", None)
        os.environ.pop("no_proxy", None)
        print(f"gateway on {gateway.proxy_url}, fake provider on {upstream.base_url}, data in {workdir}\n")

        request_ids = []
        oai = openai.OpenAI(api_key=_DEMO_PROJECT_KEY, max_retries=0, timeout=20.0)
        raw = oai.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hello."}],
            extra_headers={"x-fake-usage": _USAGE["openai-chat"]},
        )
        print("openai chat:      ", raw.parse().choices[0].message.content)
        request_ids.append(raw.headers["x-tollhouse-request-id"])

        with oai.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Count to three."}],
            stream=True,
            extra_headers={"x-fake-usage": _USAGE["openai-stream"]},
        ) as response:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
            request_ids.append(response.headers["x-tollhouse-request-id"])
        print("openai stream:    ", text)

        ant = anthropic.Anthropic(api_key=_DEMO_PROJECT_KEY, max_retries=0, timeout=20.0)
        raw = ant.messages.with_raw_response.create(
            model="claude-sonnet-4-20250514",
            max_tokens=100,
            messages=[{"role": "user", "content": "Say hello."}],
            extra_headers={"x-fake-usage": _USAGE["anthropic-message"]},
        )
        print("anthropic message:", raw.parse().content[0].text)
        request_ids.append(raw.headers["x-tollhouse-request-id"])

        with ant.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=100,
            messages=[{"role": "user", "content": "Count to three."}],
            extra_headers={"x-fake-usage": _USAGE["anthropic-stream"]},
        ) as stream:
            text = "".join(stream.text_stream)
            request_ids.append(stream.response.headers["x-tollhouse-request-id"])
        print("anthropic stream: ", text)

        for request_id in request_ids:
            gateway.wait_row(request_id)
        print("\nCost by project, model and day (tollhouse costs):\n")
        print(format_report(spend_report(gateway.database)))
        print(f"\nThe log is a DuckDB file: {gateway.database}")
        return 0
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        gateway.stop()
        upstream.stop_thread()
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
