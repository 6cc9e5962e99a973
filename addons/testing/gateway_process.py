"""Starts a real `tollhouse run` process for tests, benchmarks and the demo, and reads its log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from addons.logstore import connect_readonly

# Bounds for waiting on the process and on rows; generous so that a slow machine does not fail a test.
START_TIMEOUT = 30.0
ROW_TIMEOUT = 15.0

# Proxy and CA settings of the calling environment must not leak into the gateway process.
_CLIENT_ONLY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_FILE")


@dataclass
class GatewayProcess:
    """A `tollhouse run` process and what tests need to talk to it."""

    process: subprocess.Popen
    port: int
    data_dir: Path
    database: Path
    ca_cert: Path
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    #: Port of the base-URL listener, or None when the process did not report one.
    base_url_port: int | None = None
    #: Port of the admin listener (`/healthz`, `/metrics`), or None when the process did not report one.
    admin_port: int | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The base-URL listener's root, e.g. for `ANTHROPIC_BASE_URL`; OpenAI clients append /v1."""
        return f"http://127.0.0.1:{self.base_url_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and return the exit code; a process still running after `timeout` s is killed."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
            raise RuntimeError(f"gateway did not stop within {timeout} s after signal {sig}; killed it") from None

    def rows(self, where: str = "TRUE", params: tuple = ()) -> list[dict]:
        with connect_readonly(self.database, timeout=10.0) as con:
            cursor = con.execute(f"SELECT * FROM requests WHERE {where} ORDER BY ts", params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, values)) for values in cursor.fetchall()]

    def wait_row(self, request_id: str, timeout: float = ROW_TIMEOUT) -> dict:
        """Wait until the row of `request_id` is in the database and return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self.rows("request_id = ?", (request_id,))
            except duckdb.Error:
                found = []
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no row for {request_id} after {timeout} s; gateway log:\n{self.stderr()}")
            time.sleep(0.05)


def start_gateway(workdir: Path, rules: str, env: dict | None = None) -> GatewayProcess:
    """Start `tollhouse run` on a free loopback port and wait until it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    rules_path = workdir / "rules.yaml"
    rules_path.write_text(rules, encoding="utf-8")
    process_env = dict(os.environ)
    for name in _CLIENT_ONLY_ENV:
        process_env.pop(name, None)
    process_env["PYTHONUNBUFFERED"] = "1"
    process_env.update(env or {})
    stderr_path = workdir / "gateway.log"
    command = [sys.executable, "-m", "addons.cli", "run", "--rules", str(rules_path), "--log-level", "INFO"]
    # The default admin port, 9090, would be shared by every gateway a test run starts.
    expect_admin = re.search(r"^admin_listen:\s*(false|off|no)\s*$", rules, re.MULTILINE | re.IGNORECASE) is None
    if re.search(r"^admin_listen:", rules, re.MULTILINE) is None:
        command += ["--admin-listen", "127.0.0.1:0"]
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=process_env,
        stdout=subprocess.PIPE,
        stderr=open(stderr_path, "wb"),
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()
    port_holder: list[int] = []
    base_url_holder: list[int] = []
    admin_holder: list[int] = []

    def read_stdout() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("tollhouse listening on ") and not port_holder:
                port_holder.append(int(line.rsplit(":", 1)[1]))
            elif line.startswith("tollhouse base-url listening on ") and not base_url_holder:
                base_url_holder.append(int(line.rsplit(":", 1)[1]))
            elif line.startswith("tollhouse admin listening on ") and not admin_holder:
                admin_holder.append(int(line.rsplit(":", 1)[1]))
            if port_holder and base_url_holder and (admin_holder or not expect_admin):
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not port_holder:
        process.kill()
        raise RuntimeError(f"gateway did not start:\n{stderr_path.read_text(errors='replace')}")
    data_dir = workdir / "data"
    return GatewayProcess(
        process=process,
        port=port_holder[0],
        data_dir=data_dir,
        database=data_dir / "tollhouse.duckdb",
        ca_cert=data_dir / "ca" / "mitmproxy-ca-cert.pem",
        stderr_path=stderr_path,
        stdout_lines=lines,
        base_url_port=base_url_holder[0] if base_url_holder else None,
        admin_port=admin_holder[0] if admin_holder else None,
    )
