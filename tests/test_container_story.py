"""The docker-compose setup, played without Docker: a project in its own network namespace.

The gateway runs the image's command (`tollhouse run --rules FILE`) with docker/rules.yaml, changed
only where a container differs from this test: the listen addresses, the data folder and the
providers' base URLs, which point at the fake upstream on 127.0.0.1. The client runs under
`ip netns exec` in a namespace whose only link is a veth pair to the gateway's address, as a project
container reaches only the compose network. It calls the official OpenAI and Anthropic SDKs through
HTTPS_PROXY with the bundle from `tollhouse ca --bundle` (the `research` service), and the base-URL
listener (the `webapp` service). The test needs root and skips without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from addons.testing.fake_upstream import DEFAULT_TEXT
from addons.testing.gateway_process import START_TIMEOUT, GatewayProcess
from conftest import ANTHROPIC_REAL_KEY, OPENAI_REAL_KEY

REPO = Path(__file__).resolve().parents[1]
CONTAINER_RULES = REPO / "docker" / "rules.yaml"

RESEARCH_KEY = "th-research-key-4b1d7e"
WEBAPP_KEY = "th-webapp-key-90c2aa"

#: Seconds for each `ip` command and for the client process.
IP_TIMEOUT = 10
CLIENT_TIMEOUT = 120

#: Token counts the fake upstream reports for each call (through `x-fake-usage`).
OPENAI_USAGE = {"prompt_tokens": 1234, "completion_tokens": 56}
ANTHROPIC_USAGE = {"input_tokens": 321, "output_tokens": 45}
BASE_URL_USAGE = {"prompt_tokens": 777, "completion_tokens": 88}


@dataclass
class Namespace:
    name: str
    #: The gateway's address, on the root namespace's end of the veth pair.
    gateway_ip: str
    client_ip: str


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)


@pytest.fixture
def namespace():
    """Create a network namespace joined to the root namespace by one veth pair on a /30."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command from iproute2")

    # Names and addresses come from the process id, so parallel runs do not collide. Interface names
    # stay within Linux's limit of 15 characters.
    suffix = os.getpid() % 100000
    name = f"th-story-{suffix}"
    host_end, namespace_end = f"thh{suffix}", f"thn{suffix}"
    subnet = f"10.213.{suffix % 250}"
    gateway_ip, client_ip = f"{subnet}.1", f"{subnet}.2"

    added = ip("netns", "add", name)
    if added.returncode != 0:
        pytest.skip(f"ip netns add failed: {added.stderr.strip()}")
    try:
        steps = [
            ("link", "add", host_end, "type", "veth", "peer", "name", namespace_end, "netns", name),
            ("addr", "add", f"{gateway_ip}/30", "dev", host_end),
            ("link", "set", host_end, "up"),
            ("-n", name, "addr", "add", f"{client_ip}/30", "dev", namespace_end),
            ("-n", name, "link", "set", namespace_end, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                pytest.skip(f"ip {' '.join(step)} failed: {result.stderr.strip()}")
        yield Namespace(name, gateway_ip, client_ip)
    finally:
        # Deleting the namespace deletes its veth end, and with it the pair. The second command
        # covers a pair whose namespace end was never moved.
        ip("netns", "del", name)
        if ip("link", "show", host_end).returncode == 0:
            ip("link", "del", host_end)


def container_rules(fake_port: int, gateway_ip: str, data_dir: Path) -> str:
    """Return docker/rules.yaml with this test's addresses, data folder and upstream."""
    rules = yaml.safe_load(CONTAINER_RULES.read_text(encoding="utf-8"))
    rules["listen"] = f"{gateway_ip}:0"
    rules["base_url_listen"] = f"{gateway_ip}:0"
    rules["data_dir"] = str(data_dir)
    rules["logging"]["flush_interval"] = 0.2
    for provider in rules["providers"].values():
        provider["base_url"] = f"http://127.0.0.1:{fake_port}"
    return yaml.safe_dump(rules, sort_keys=False)


def tollhouse_command() -> list[str]:
    """Return the `tollhouse` console script of this Python, as in the image, or the module as a fallback."""
    script = Path(sys.executable).with_name("tollhouse")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "addons.cli"]


def gateway_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "SSL_CERT_FILE"}
    env.update(
        PYTHONUNBUFFERED="1",
        OPENAI_API_KEY=OPENAI_REAL_KEY,
        ANTHROPIC_API_KEY=ANTHROPIC_REAL_KEY,
        TOLLHOUSE_KEY_RESEARCH=RESEARCH_KEY,
        TOLLHOUSE_KEY_WEBAPP=WEBAPP_KEY,
    )
    return env


def start_container_gateway(workdir: Path, rules_path: Path, data_dir: Path) -> GatewayProcess:
    """Run `tollhouse run --rules FILE`, the image's command, and wait for both listening lines."""
    stderr_path = workdir / "gateway.log"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [*tollhouse_command(), "run", "--rules", str(rules_path)],
            cwd=workdir, env=gateway_env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    lines: list[str] = []
    ports: dict[str, int] = {}
    ready = threading.Event()

    def read_stdout() -> None:
        for line in process.stdout:
            lines.append(line)
            for prefix, listener in (("tollhouse listening on ", "proxy"), ("tollhouse base-url listening on ", "base_url")):
                if line.startswith(prefix):
                    ports[listener] = int(line.rsplit(":", 1)[1])
            if len(ports) == 2:
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or len(ports) != 2:
        process.kill()
        process.wait(timeout=10)
        raise AssertionError(f"gateway did not start:\n{stderr_path.read_text(errors='replace')}")
    return GatewayProcess(
        process=process,
        port=ports["proxy"],
        data_dir=data_dir,
        database=data_dir / "tollhouse.duckdb",
        ca_cert=data_dir / "ca" / "mitmproxy-ca-cert.pem",
        stderr_path=stderr_path,
        stdout_lines=lines,
        base_url_port=ports["base_url"],
    )


CLIENT = textwrap.dedent('''
    """Runs inside the namespace: SDK calls as the two compose projects, then reachability probes."""
    import json
    import os
    import socket

    import anthropic
    import openai

    gateway_ip = os.environ["STORY_GATEWAY_IP"]
    fake_port = int(os.environ["STORY_FAKE_PORT"])
    proxy_port = int(os.environ["STORY_PROXY_PORT"])
    messages = [{"role": "user", "content": "Say hello"}]
    results = {}

    # The research project: HTTPS_PROXY with the project key, SSL_CERT_FILE with the bundle.
    raw = openai.OpenAI(max_retries=0, timeout=20).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages,
        extra_headers={"x-fake-usage": os.environ["STORY_OPENAI_USAGE"]},
    )
    completion = raw.parse()
    results["openai"] = {
        "request_id": raw.headers["x-tollhouse-request-id"],
        "text": completion.choices[0].message.content,
        "input_tokens": completion.usage.prompt_tokens,
        "output_tokens": completion.usage.completion_tokens,
    }

    raw = anthropic.Anthropic(max_retries=0, timeout=20).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=messages,
        extra_headers={"x-fake-usage": os.environ["STORY_ANTHROPIC_USAGE"]},
    )
    message = raw.parse()
    results["anthropic"] = {
        "request_id": raw.headers["x-tollhouse-request-id"],
        "text": "".join(block.text for block in message.content if block.type == "text"),
        "input_tokens": message.usage.input_tokens,
        "output_tokens": message.usage.output_tokens,
    }

    # The webapp project: plain HTTP to the base-URL listener, no proxy, no CA.
    base_url_client = openai.OpenAI(
        base_url=os.environ["STORY_BASE_URL"], api_key=os.environ["STORY_WEBAPP_KEY"], max_retries=0, timeout=20,
    )
    raw = base_url_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages,
        extra_headers={"x-fake-usage": os.environ["STORY_BASE_URL_USAGE"]},
    )
    completion = raw.parse()
    results["base_url"] = {
        "request_id": raw.headers["x-tollhouse-request-id"],
        "text": completion.choices[0].message.content,
        "input_tokens": completion.usage.prompt_tokens,
        "output_tokens": completion.usage.completion_tokens,
    }

    def connect(host, port):
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as e:
            return type(e).__name__
        return "connected"

    def tunnel_status(target):
        """Ask the gateway for a CONNECT tunnel to `target` and return the status line's code."""
        with socket.create_connection((gateway_ip, proxy_port), timeout=5) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
            return int(sock.recv(4096).split(b" ", 2)[1])

    results["probes"] = {
        "fake_on_loopback": connect("127.0.0.1", fake_port),
        "fake_on_gateway_ip": connect(gateway_ip, fake_port),
        "tunnel_to_fake": tunnel_status(f"127.0.0.1:{fake_port}"),
    }
    print(json.dumps(results))
''')


def run_client(namespace: Namespace, gateway: GatewayProcess, bundle: Path, fake_port: int, script: Path) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "HTTPS_PROXY": f"http://research:{RESEARCH_KEY}@{namespace.gateway_ip}:{gateway.port}",
        "SSL_CERT_FILE": str(bundle),
        "OPENAI_API_KEY": "placeholder",
        "ANTHROPIC_API_KEY": "placeholder",
        "STORY_GATEWAY_IP": namespace.gateway_ip,
        "STORY_FAKE_PORT": str(fake_port),
        "STORY_PROXY_PORT": str(gateway.port),
        "STORY_BASE_URL": f"http://{namespace.gateway_ip}:{gateway.base_url_port}/v1",
        "STORY_WEBAPP_KEY": WEBAPP_KEY,
        "STORY_OPENAI_USAGE": json.dumps(OPENAI_USAGE),
        "STORY_ANTHROPIC_USAGE": json.dumps(ANTHROPIC_USAGE),
        "STORY_BASE_URL_USAGE": json.dumps(BASE_URL_USAGE),
    }
    result = subprocess.run(
        ["ip", "netns", "exec", namespace.name, sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )
    assert result.returncode == 0, f"client failed:\n{result.stderr}\ngateway log:\n{gateway.stderr()}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compose_story_in_namespace(namespace, fake, tmp_path):
    data_dir = tmp_path / "data"
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(container_rules(fake.port, namespace.gateway_ip, data_dir), encoding="utf-8")
    bundle = tmp_path / "certs" / "ca-bundle.pem"
    script = tmp_path / "client.py"
    script.write_text(CLIENT, encoding="utf-8")

    # The compose file's one-shot service: create the CA and write the bundle before the gateway starts.
    ca = subprocess.run(
        [*tollhouse_command(), "ca", "--rules", str(rules_path), "--bundle", str(bundle)],
        env=gateway_env(), capture_output=True, text=True, timeout=60,
    )
    assert ca.returncode == 0, ca.stderr
    assert bundle.read_bytes().endswith((data_dir / "ca" / "mitmproxy-ca-cert.pem").read_bytes())

    gateway = start_container_gateway(tmp_path, rules_path, data_dir)
    try:
        results = run_client(namespace, gateway, bundle, fake.port, script)
        rows = {name: gateway.wait_row(results[name]["request_id"]) for name in ("openai", "anthropic", "base_url")}
    finally:
        exit_code = gateway.stop()

    assert exit_code == 0, gateway.stderr()

    assert results["openai"]["text"] == DEFAULT_TEXT
    assert results["anthropic"]["text"] == DEFAULT_TEXT
    assert results["base_url"]["text"] == DEFAULT_TEXT
    assert (results["openai"]["input_tokens"], results["openai"]["output_tokens"]) == (1234, 56)
    assert (results["anthropic"]["input_tokens"], results["anthropic"]["output_tokens"]) == (321, 45)
    assert (results["base_url"]["input_tokens"], results["base_url"]["output_tokens"]) == (777, 88)

    expected = {
        "openai": ("research", "openai", "proxy", 1234, 56),
        "anthropic": ("research", "anthropic", "proxy", 321, 45),
        "base_url": ("webapp", "openai", "base_url", 777, 88),
    }
    for name, (project, provider, listener, input_tokens, output_tokens) in expected.items():
        row = rows[name]
        assert (row["project"], row["provider"], row["listener"]) == (project, provider, listener), name
        assert row["status"] == 200, name
        assert (row["input_tokens"], row["output_tokens"]) == (input_tokens, output_tokens), name
        assert row["price_flag"] == "priced", name
        assert row["cost_usd"] > 0, name

    # The namespace reaches the gateway's listeners and nothing else: not the upstream, neither on
    # loopback nor on the gateway's address, and the gateway refuses to tunnel to its loopback.
    assert results["probes"]["fake_on_loopback"] == "ConnectionRefusedError"
    assert results["probes"]["fake_on_gateway_ip"] == "ConnectionRefusedError"
    assert results["probes"]["tunnel_to_fake"] == 403
    routes = ip("-n", namespace.name, "route", "show").stdout
    assert "default" not in routes, routes

    log = gateway.stderr()
    for secret in (OPENAI_REAL_KEY, ANTHROPIC_REAL_KEY, RESEARCH_KEY, WEBAPP_KEY):
        assert secret not in log
