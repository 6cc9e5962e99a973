"""The `tollhouse` command's failures: one `tollhouse: ...` line on stderr naming the value and the fix.

Each test runs `python -m addons.cli` in a temporary folder. None of them reaches a listening gateway,
so no test opens a network connection.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from addons.logstore import LogStore
from addons.rules import project_key_digest

REPO = Path(__file__).resolve().parents[1]
# Bound for each CLI process, in seconds. `costs` alone waits 5 s for a locked database.
PROCESS_TIMEOUT = 60

RULES = """
listen: 127.0.0.1:0
base_url_listen: 127.0.0.1:0
data_dir: {data_dir}
providers:
  openai:
    base_url: http://127.0.0.1:9
    key_env: TH_CLI_PROVIDER_KEY
projects:
  alpha:
    key_env: TH_CLI_UNSET_KEY
"""


def cli_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.upper().endswith("_PROXY")}
    env.pop("TH_CLI_UNSET_KEY", None)
    env.pop("TH_CLI_PROVIDER_KEY", None)
    return env


def run_cli(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", *args],
        cwd=cwd,
        env=cli_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def write_rules(folder: Path, data_dir: str = "data", extra: str = "") -> Path:
    path = folder / "rules.yaml"
    path.write_text(textwrap.dedent(RULES.format(data_dir=data_dir)) + textwrap.dedent(extra), encoding="utf-8")
    return path


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the last stderr line after checking that the failure has no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# -- costs --since ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2024-13-01", "yesterday", "01.03.2025"])
def test_costs_since_invalid_date(tmp_path, value):
    result = run_cli("costs", "--since", value, cwd=tmp_path)

    assert result.returncode == 2
    line = error_line(result)
    assert line.endswith(f"argument --since: invalid date '{value}': use YYYY-MM-DD")
    assert "fromisoformat" not in result.stderr


# -- hash-key --------------------------------------------------------------------------------------


def test_hash_key_prints_digest(tmp_path):
    result = run_cli("hash-key", cwd=tmp_path, stdin="th-key-123\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == project_key_digest("th-key-123")


def test_hash_key_empty_stdin(tmp_path):
    result = run_cli("hash-key", cwd=tmp_path, stdin="")

    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("tollhouse: no key given: ")
    assert "printf %s KEY | tollhouse hash-key" in line
    assert result.stdout == ""


@pytest.mark.parametrize("typed", [b"\x04", b"\n"], ids=["ctrl-d", "empty-line"])
def test_hash_key_prompt_without_key(tmp_path, typed):
    primary, secondary = pty.openpty()
    try:
        # A new session has no controlling terminal, so getpass prompts on stderr and reads the pty.
        process = subprocess.Popen(
            [sys.executable, "-m", "addons.cli", "hash-key"],
            cwd=tmp_path,
            env=cli_env(),
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        os.close(secondary)
        secondary = -1
        try:
            # getpass flushes pending input when it turns off echo, so type only after the prompt.
            stderr = b""
            deadline = time.monotonic() + PROCESS_TIMEOUT
            while b"project key: " not in stderr:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no prompt; stderr so far: {stderr!r}"
                ready, _, _ = select.select([process.stderr], [], [], remaining)
                if ready:
                    chunk = os.read(process.stderr.fileno(), 4096)
                    assert chunk, f"stderr closed before the prompt: {stderr!r}"
                    stderr += chunk
            os.write(primary, typed)
            stdout, rest = process.communicate(timeout=PROCESS_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=PROCESS_TIMEOUT)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)

    text = (stderr + rest).decode()
    assert process.returncode == 2
    assert "Traceback" not in text, text
    assert text.strip().splitlines()[-1].startswith("tollhouse: no key given: ")
    assert stdout == b""


# -- data_dir --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "ca"])
def test_data_dir_not_creatable(tmp_path, command):
    (tmp_path / "blocker").write_text("a file where data_dir needs a folder\n", encoding="utf-8")
    rules = write_rules(tmp_path, data_dir="blocker/data")

    result = run_cli(command, "--rules", str(rules), cwd=tmp_path)

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"tollhouse: cannot create data_dir {tmp_path / 'blocker' / 'data'}: ")
    assert f"Set data_dir in {rules}" in line
    assert "tollhouse listening" not in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_ca_data_dir_read_only(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    rules = write_rules(tmp_path)
    try:
        result = run_cli("ca", "--rules", str(rules), cwd=tmp_path)
    finally:
        data_dir.chmod(stat.S_IRWXU)

    assert result.returncode == 1
    assert error_line(result).startswith(f"tollhouse: cannot write the CA into data_dir {data_dir}: ")


@pytest.mark.parametrize("command", ["run", "ca"])
def test_ca_folder_blocked_by_file(tmp_path, command):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ca").write_text("a file where the CA folder belongs\n", encoding="utf-8")
    rules = write_rules(tmp_path)

    result = run_cli(command, "--rules", str(rules), cwd=tmp_path)

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"tollhouse: cannot write the CA into data_dir {tmp_path / 'data'}: ")
    assert "Make the folder writable" in line


# -- the request log -------------------------------------------------------------------------------


def test_run_second_gateway_on_same_log(tmp_path):
    rules = write_rules(tmp_path)
    database = tmp_path / "data" / "tollhouse.duckdb"
    # The first gateway's request log: it holds the lock on the spool next to the database.
    first = LogStore(database, 0.5)
    first.start()
    try:
        result = run_cli("run", "--rules", str(rules), cwd=tmp_path)
    finally:
        first.close()

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"tollhouse: another tollhouse process is writing the request log {database}")
    assert "Stop it or configure a different log path." in line
    assert "tollhouse listening" not in result.stdout


def test_run_warns_about_unset_project_key(tmp_path):
    rules = write_rules(tmp_path)
    database = tmp_path / "data" / "tollhouse.duckdb"
    # The warning comes before the request log opens, and the held log stops the gateway before it listens.
    first = LogStore(database, 0.5)
    first.start()
    try:
        result = run_cli("run", "--rules", str(rules), cwd=tmp_path)
    finally:
        first.close()

    assert "project alpha has no key: TH_CLI_UNSET_KEY is unset in the gateway's environment" in result.stderr


def test_costs_database_locked(tmp_path):
    rules = write_rules(tmp_path)
    database = tmp_path / "data" / "tollhouse.duckdb"
    database.parent.mkdir()
    # A read-write connection in this process keeps the CLI's read-only connection out.
    with duckdb.connect(str(database)):
        result = run_cli("costs", "--rules", str(rules), cwd=tmp_path)

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"tollhouse: cannot read the request log: timed out after 5 s waiting to open {database}")
    assert "Close that session" in line


# -- plugins ---------------------------------------------------------------------------------------

BROKEN_PLUGIN = '''
from addons import hookimpl


@hookimpl
def tollhouse_configure(rules):
    raise ValueError("settings.broken.level must be a number")
'''


def test_run_plugin_configure_error(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN_PLUGIN, encoding="utf-8")
    rules = write_rules(tmp_path, extra="plugins:\n  - broken.py\n")

    result = run_cli("run", "--rules", str(rules), cwd=tmp_path)

    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"tollhouse: plugin tollhouse_plugin_broken ({plugin}) failed in tollhouse_configure: ")
    assert "ValueError: settings.broken.level must be a number" in line
    assert "tollhouse listening" not in result.stdout
    assert not (tmp_path / "data" / "tollhouse.duckdb").exists()


# -- scripts/setup.sh ------------------------------------------------------------------------------

# A stand-in for a Python interpreter, so that the test needs neither a second Python nor pip's index.
# The file `identity` next to it contains what setup.sh's identity check prints. `-m venv DIR` copies
# the script and that file into DIR/bin, because a venv shares its creator's version and base interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "venv" ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    cp "$here/identity" "$3/bin/identity"
    exit 0
fi
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ]; then
    echo "pip install with $(cat "$here/identity")" >> "$FAKE_PYTHON_LOG"
    exit 0
fi
if [ "${1:-}" = "--version" ]; then
    echo "Python $(cut -d' ' -f1 "$here/identity")"
    exit 0
fi
if [ "${1:-}" = "-c" ]; then
    case "$2" in
        *realpath*) cat "$here/identity" ;;
    esac
    exit 0
fi
exit 1
"""


def fake_python(folder: Path, identity: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "identity").write_text(identity + "\n", encoding="utf-8")
    python = folder / "python"
    python.write_text(FAKE_PYTHON, encoding="utf-8")
    python.chmod(0o755)
    return python


@pytest.fixture
def setup_copy(tmp_path) -> Path:
    """Return a folder with scripts/setup.sh, a pyproject.toml and Node test packages marked installed."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text('[project]\nname = "placeholder"\n', encoding="utf-8")
    node_tests = root / "tests" / "node"
    (node_tests / "node_modules").mkdir(parents=True)
    (node_tests / "package-lock.json").write_text("{}\n", encoding="utf-8")
    (node_tests / "node_modules" / ".package-lock.json").write_text("{}\n", encoding="utf-8")
    return root


def run_setup(root: Path, python: Path | str | None) -> subprocess.CompletedProcess:
    env = cli_env()
    env.pop("TOLLHOUSE_PYTHON", None)
    env["FAKE_PYTHON_LOG"] = str(root / "pip.log")
    if python is not None:
        env["TOLLHOUSE_PYTHON"] = str(python)
    return subprocess.run(
        ["bash", "-c", "source scripts/setup.sh"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def pip_runs(root: Path) -> list[str]:
    log = root / "pip.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def test_setup_recreates_venv_for_other_python(setup_copy, tmp_path):
    python_a = fake_python(tmp_path / "a", "3.12 /opt/a/bin/python3.12")
    python_b = fake_python(tmp_path / "b", "3.13 /opt/b/bin/python3.13")

    created = run_setup(setup_copy, python_a)
    assert created.returncode == 0, created.stderr
    assert "creating" in created.stderr
    assert pip_runs(setup_copy) == ["pip install with 3.12 /opt/a/bin/python3.12"]

    same = run_setup(setup_copy, python_a)
    assert same.returncode == 0, same.stderr
    assert same.stderr == ""
    assert len(pip_runs(setup_copy)) == 1

    unset = run_setup(setup_copy, None)
    assert unset.returncode == 0, unset.stderr
    assert unset.stderr == ""
    assert len(pip_runs(setup_copy)) == 1

    other = run_setup(setup_copy, python_b)
    assert other.returncode == 0, other.stderr
    assert "uses Python 3.12 /opt/a/bin/python3.12, but TOLLHOUSE_PYTHON is Python 3.13" in other.stderr
    assert "recreating it" in other.stderr
    assert pip_runs(setup_copy)[-1] == "pip install with 3.13 /opt/b/bin/python3.13"
    assert (setup_copy / ".venv" / "bin" / "identity").read_text(encoding="utf-8").strip() == "3.13 /opt/b/bin/python3.13"


def test_setup_python_not_found(setup_copy, tmp_path):
    fake_python(tmp_path / "a", "3.12 /opt/a/bin/python3.12")
    assert run_setup(setup_copy, tmp_path / "a" / "python").returncode == 0
    missing = tmp_path / "absent" / "python3.12"

    result = run_setup(setup_copy, missing)

    assert result.returncode != 0
    assert f"TOLLHOUSE_PYTHON={missing} not found" in result.stderr
    assert "is not a Python >= 3.12" not in result.stderr
    assert (setup_copy / ".venv" / "bin" / "python").exists()
