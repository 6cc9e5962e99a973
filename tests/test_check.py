"""`tollhouse check`: every problem of a rules file on its own line, with the key, the value and the fix.

Each test runs `python -m addons.cli check` in a temporary folder, as a user would. The expected
output is spelled out line by line, so a test fails on a changed, missing or extra message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from addons.rules import RulesError, load_rules

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT = 60

#: Variables that the rules below name. Each test sets the ones it needs.
KEY_VARIABLES = ("TH_CHECK_OPENAI", "TH_CHECK_ANTHROPIC", "TH_CHECK_ALPHA")
ALL_KEYS_SET = {name: "set-for-the-test" for name in KEY_VARIABLES}

VALID = """
listen: 127.0.0.1:8080
base_url_listen: 127.0.0.1:8787
providers:
  openai:
    base_url: https://api.openai.com
    key_env: TH_CHECK_OPENAI
  anthropic:
    base_url: https://api.anthropic.com
    key_env: TH_CHECK_ANTHROPIC
projects:
  alpha:
    key_env: TH_CHECK_ALPHA
  beta:
    key_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
"""


def run_check(tmp_path: Path, text: str | None, env: dict[str, str] | None = None, name: str = "rules.yaml"):
    if text is not None:
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    process_env = {key: value for key, value in os.environ.items() if key not in KEY_VARIABLES}
    process_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", "check", "--rules", name],
        cwd=tmp_path,
        env=process_env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


def test_check_valid_file(tmp_path):
    result = run_check(tmp_path, VALID, ALL_KEYS_SET)

    assert output_lines(result) == [
        "rules.yaml: ok: 2 providers (openai, anthropic), 2 projects (alpha, beta); "
        "proxy on 127.0.0.1:8080, base URL on 127.0.0.1:8787",
    ]
    assert result.returncode == 0


def test_check_unset_variables_warn(tmp_path):
    result = run_check(tmp_path, VALID, {"TH_CHECK_OPENAI": "set-for-the-test"})

    assert output_lines(result) == [
        "rules.yaml: warning: providers.anthropic.key_env: TH_CHECK_ANTHROPIC is unset in this environment, "
        "so calls to anthropic fail. Set it in the gateway's environment.",
        "rules.yaml: warning: projects.alpha.key_env: TH_CHECK_ALPHA is unset in this environment, "
        "so the project rejects every call. Set it in the gateway's environment.",
        "rules.yaml: ok: 2 providers (openai, anthropic), 2 projects (alpha, beta); "
        "proxy on 127.0.0.1:8080, base URL on 127.0.0.1:8787",
    ]
    assert result.returncode == 0


BROKEN_SECTIONS = """
listen: 0.0.0.0:80800
lisen: 0.0.0.0:8080
providers:
  openai:
    kind: opnai
    base_url: https://api.openai.com
    key_env: TH_CHECK_OPENAI
  anthropic:
    base_url: https://api.anthropic.com/v1
    key_env: TH_CHECK_ANTHROPIC
projects:
  alpha:
    key: sk-do-not-print-me
  beta:
    key_sha256: not-a-digest
  gamma:
    key_env: TH_CHECK_ALPHA
routes:
  cheap:
    provider: openai
  nowhere:
    provider: mistral
logging:
  flush_interval: 5
  bodies: yes please
prices:
  my-model:
    input: 1.0
  other-model:
    input: cheap
    output: 2.0
cache:
  ttl: -1
  projects:
    delta: {}
budgets:
  warn_at: 2
  projects:
    alpha:
      daily_usd: 0
shutdown_grace: soon
"""


def test_check_reports_every_section(tmp_path):
    result = run_check(tmp_path, BROKEN_SECTIONS, ALL_KEYS_SET)

    assert output_lines(result) == [
        "rules.yaml: lisen: is not a known setting (got '0.0.0.0:8080'). Did you mean listen? Allowed here: "
        "admin_listen, base_url_listen, budgets, cache, data_dir, fallbacks, listen, log_format, logging, max_request_bytes, "
        "plugins, prices, projects, providers, rate_limits, routes, settings, shutdown_grace, tunnels.",
        "rules.yaml: listen: is not HOST:PORT (got '0.0.0.0:80800'). Write it like 0.0.0.0:8080 "
        "(port 0 picks a free port).",
        "rules.yaml: providers.openai.kind: is not a supported API kind (got 'opnai'). "
        "Use one of: openai, anthropic, azure, openai-compatible.",
        "rules.yaml: providers.anthropic.base_url: has a path or query (got 'https://api.anthropic.com/v1'). "
        "Give scheme, host and port only; request paths such as /v1/messages are kept as the client sent them.",
        "rules.yaml: projects.alpha.key: is a plaintext key; the rules file must not contain keys (got '<hidden>'). "
        "Use key_env: VARIABLE, or key_sha256: <output of: printf %s KEY | tollhouse hash-key>.",
        "rules.yaml: projects.beta.key_sha256: is not a sha256 hex digest (got 'not-a-digest'). "
        "Compute it with: printf %s KEY | tollhouse hash-key (or printf %s KEY | sha256sum, "
        "dropping the trailing ' -' that sha256sum prints).",
        "rules.yaml: routes.nowhere.provider: is not a provider of the rules (got 'mistral'). "
        "Use one of: openai, anthropic.",
        "rules.yaml: logging.flush_interval: is above 1 second (got 5.0). "
        "Keep it at most 1: a killed gateway loses the rows of the last interval.",
        "rules.yaml: logging.bodies: is not true or false (got 'yes please'). Write bodies: true or bodies: false.",
        "rules.yaml: prices.my-model.output: is missing (got None). Give the price in USD per million tokens, e.g. 2.50.",
        "rules.yaml: prices.other-model.input: is not a number (got 'cheap'). Give USD per million tokens, e.g. 2.50.",
        "rules.yaml: shutdown_grace: is not a positive number (got 'soon'). Give a number greater than 0.",
        "rules.yaml: cache.ttl: is not a positive number (got -1). Give a number greater than 0.",
        "rules.yaml: cache.projects.delta: is not a project declared in the rules (got 'delta'). "
        "Use one of: alpha, beta, gamma.",
        "rules.yaml: budgets.warn_at: is not a fraction in (0, 1] (got 2). Write it like 0.8 for a warning at 80 %.",
        "rules.yaml: budgets.projects.alpha.daily_usd: is not a positive number (got 0). Give US dollars, e.g. 25 or 2.50.",
        "rules.yaml: 16 problems found",
    ]
    assert "sk-do-not-print-me" not in result.stdout
    assert result.returncode == 2


DUPLICATES = """
providers:
  openai:
    base_url: https://api.openai.com
    key_env: TH_CHECK_OPENAI
  openai:
    base_url: https://api.openai.com
    key_env: TH_CHECK_OPENAI
    key_env: TH_CHECK_OPENAI
  azure-east:
    kind: azure
    base_url: https://east.example.com
    key_env: TH_CHECK_OPENAI
    hosts: [api.openai.com]
projects:
  alpha:
    key_env: TH_CHECK_ALPHA
tunnels:
  allow: sometimes
  blocked_networks: [10.0.0.0/8, not-a-network]
rate_limits:
  providers:
    groq:
      max_concurrent: 2
"""


def test_check_duplicates_and_later_errors(tmp_path):
    result = run_check(tmp_path, DUPLICATES, ALL_KEYS_SET)

    assert output_lines(result) == [
        "rules.yaml: providers.openai: is defined twice, on lines 3 and 6 (got 'openai'). Remove one of them, "
        "or merge them into one entry: YAML would silently keep only the last one.",
        "rules.yaml: providers.openai.key_env: is defined twice, on lines 8 and 9 (got 'key_env'). Remove one of "
        "them, or merge them into one entry: YAML would silently keep only the last one.",
        "rules.yaml: providers.azure-east.hosts: is already intercepted for provider 'openai' (got 'api.openai.com'). "
        "Give each provider its own hosts.",
        "rules.yaml: tunnels.allow: is not true or false (got 'sometimes'). Write allow: true or allow: false.",
        "rules.yaml: tunnels.blocked_networks[1]: is not a network (got 'not-a-network'). "
        "Write it like 10.0.0.0/8 or ::1/128.",
        "rules.yaml: rate_limits.providers.groq: is not a provider declared in the rules (got 'groq'). "
        "Use one of: openai, azure-east.",
        "rules.yaml: 6 problems found",
    ]
    assert result.returncode == 2


def test_check_yaml_syntax_error(tmp_path):
    text = "providers:\n  openai:\n    base_url: https://api.openai.com\n   key_env: X\n"
    result = run_check(tmp_path, text)

    assert output_lines(result) == [
        "rules.yaml: line 4, column 4: is not valid YAML: expected <block end>, but found '<block mapping start>'. "
        "Fix the YAML syntax at that line.",
        "rules.yaml: 1 problem found",
    ]
    assert result.returncode == 2


def test_check_empty_sections(tmp_path):
    result = run_check(tmp_path, "providers: {}\nprojects: []\n")

    assert output_lines(result) == [
        "rules.yaml: providers: is empty (got {}). Declare at least one provider (see rules.yaml).",
        "rules.yaml: projects: is not a mapping (got []). Write it as `key: value` lines indented under it.",
        "rules.yaml: 2 problems found",
    ]
    assert result.returncode == 2


def test_check_top_level_not_mapping(tmp_path):
    result = run_check(tmp_path, "- listen: 0.0.0.0:8080\n")

    assert output_lines(result) == [
        "rules.yaml: rules file: is not a mapping (got [{'listen': '0.0.0.0:8080'}]). "
        "Write it as `key: value` lines indented under it.",
        "rules.yaml: 1 problem found",
    ]
    assert result.returncode == 2


def test_check_missing_file(tmp_path):
    result = run_check(tmp_path, None, name="absent.yaml")

    assert output_lines(result) == [
        "absent.yaml: rules file: cannot be read: No such file or directory (got 'absent.yaml'). "
        "Pass an existing file with --rules.",
        "absent.yaml: 1 problem found",
    ]
    assert result.returncode == 2


@pytest.mark.parametrize("text", [BROKEN_SECTIONS, DUPLICATES], ids=["sections", "duplicates"])
def test_check_includes_loader_error(tmp_path, text):
    """The error that stops the gateway at start is among the errors that `check` lists."""
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(RulesError) as raised:
        load_rules(path)

    result = run_check(tmp_path, None, ALL_KEYS_SET)

    assert f"rules.yaml: {raised.value}" in output_lines(result)


@pytest.mark.parametrize("rules", ["rules.yaml", "docker/rules.yaml"])
def test_check_shipped_rules_valid(rules):
    env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")}
    result = subprocess.run(
        [sys.executable, "-m", "addons.cli", "check", "--rules", str(REPO / rules)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
    )

    lines = output_lines(result)
    assert lines[-1].startswith(f"{REPO / rules}: ok: 2 providers (openai, anthropic)"), result.stdout
    assert result.returncode == 0
