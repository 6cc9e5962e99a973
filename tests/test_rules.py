"""Rules validation: good files load typed; each bad value is named with its fix."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from addons.rules import RulesError, load_rules, project_key_digest

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
providers:
  openai:
    base_url: https://api.openai.com
    key_env: OPENAI_API_KEY
projects:
  alpha:
    key_sha256: {digest}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_default_rules_file_loads(monkeypatch):
    monkeypatch.setenv("TOLLHOUSE_PROJECT_KEY", "k" * 20)
    rules = load_rules(REPO / "rules.yaml")

    assert (rules.listen_host, rules.listen_port) == ("0.0.0.0", 8080)
    assert rules.data_dir == REPO / "data"
    assert rules.logging.database == REPO / "data" / "tollhouse.duckdb"
    assert rules.providers["openai"].address == ("api.openai.com", 443)
    assert rules.providers["anthropic"].hosts == ("api.anthropic.com",)
    assert rules.projects["default"].key_sha256 == project_key_digest("k" * 20)
    assert rules.intercepted_hosts == {"api.openai.com", "api.anthropic.com"}


def test_minimal_rules_defaults(tmp_path):
    rules = load_rules(write(tmp_path, MINIMAL.format(digest="a" * 64)))

    provider = rules.providers["openai"]
    assert (provider.kind, provider.scheme, provider.port, provider.key_env) == ("openai", "https", 443, "OPENAI_API_KEY")
    assert rules.logging.flush_interval == 0.5
    assert rules.logging.bodies is False
    assert rules.max_request_bytes == 32 * 1024 * 1024
    assert rules.plugins == ()


def test_base_url_port_and_prices(tmp_path):
    text = MINIMAL.format(digest="b" * 64).replace("https://api.openai.com", "http://127.0.0.1:9999")
    text += "prices:\n  house-model:\n    input: 1.25\n    output: 5\n    cache_read: 0.125\n"
    rules = load_rules(write(tmp_path, text))

    assert rules.providers["openai"].address == ("127.0.0.1", 9999)
    assert rules.providers["openai"].hosts == ("api.openai.com",)
    price = rules.prices["house-model"]
    assert (price.input, price.output, price.cache_read, price.cache_write) == (
        Decimal("1.25"), Decimal("5"), Decimal("0.125"), None,
    )


def test_plugin_paths_resolve_against_rules_folder(tmp_path):
    text = MINIMAL.format(digest="c" * 64) + "plugins:\n  - local/team.py\n  - mypkg.plugin\n"
    rules = load_rules(write(tmp_path, text))

    assert rules.plugins == (str(tmp_path / "local" / "team.py"), "mypkg.plugin")


@pytest.mark.parametrize(
    ("replace", "key", "fix"),
    [
        (("key_sha256: " + "d" * 64, "key: sk-secret-value"), "projects.alpha.key", "key_env"),
        (("https://api.openai.com", "ftp://api.openai.com"), "providers.openai.base_url", "https://api.openai.com"),
        (("https://api.openai.com", "https://api.openai.com/v1"), "providers.openai.base_url", "scheme, host and port"),
        (("    key_env: OPENAI_API_KEY", "    key_env: OPENAI_API_KEY\n    kind: gemini"), "providers.openai.kind", "openai, anthropic"),
        (("key_sha256: " + "d" * 64, "key_sha256: not-a-digest"), "projects.alpha.key_sha256", "tollhouse hash-key"),
        (("https://api.openai.com", "https://user:sk-secret-value@api.openai.com"), "providers.openai.base_url", "put the key in key_env"),
        (("https://api.openai.com", "https://api.openai.com:https"), "providers.openai.base_url", "Give a port"),
        (("key_env: OPENAI_API_KEY", "key_env: 1BAD-NAME"), "providers.openai.key_env", "OPENAI_API_KEY"),
        (("providers:", "listen: nowhere\nproviders:"), "listen", "0.0.0.0:8080"),
        (("providers:", "colour: blue\nproviders:"), "colour", "Allowed here"),
        (("providers:", "loging: {}\nproviders:"), "loging", "Did you mean logging?"),
    ],
)
def test_invalid_value_named_with_fix(tmp_path, replace, key, fix):
    text = MINIMAL.format(digest="d" * 64).replace(*replace)

    with pytest.raises(RulesError) as raised:
        load_rules(write(tmp_path, text))

    message = str(raised.value)
    assert message.startswith(key + ":")
    assert fix in message
    assert "sk-secret-value" not in message


def test_key_sha256_hint_drops_sha256sum_suffix(tmp_path):
    text = MINIMAL.format(digest="d" * 64).replace("d" * 64, "not-a-digest")

    with pytest.raises(RulesError) as raised:
        load_rules(write(tmp_path, text))

    assert "printf %s KEY | sha256sum" in str(raised.value)
    assert "trailing ' -'" in str(raised.value)


def test_duplicate_key_named_with_lines(tmp_path):
    text = MINIMAL.format(digest="1" * 64) + "  alpha:\n    key_env: TH_OTHER_KEY\n"

    with pytest.raises(RulesError) as raised:
        load_rules(write(tmp_path, text))

    message = str(raised.value)
    assert message.startswith("projects.alpha: is defined twice, on lines 7 and 9 ")
    assert "Remove one of them" in message


def test_duplicate_top_level_key(tmp_path):
    text = MINIMAL.format(digest="2" * 64) + "projects:\n  beta:\n    key_env: TH_OTHER_KEY\n"

    with pytest.raises(RulesError, match=r"^projects: is defined twice, on lines 6 and 9 "):
        load_rules(write(tmp_path, text))


def test_duplicate_key_in_list_item(tmp_path):
    text = MINIMAL.format(digest="3" * 64) + "plugins:\n  - {a: 1, a: 2}\n"

    with pytest.raises(RulesError, match=r"^plugins\[0\]\.a: is defined twice"):
        load_rules(write(tmp_path, text))


def test_merge_key_may_be_overridden(tmp_path):
    text = MINIMAL.format(digest="a" * 64).replace("  openai:\n", "  openai: &openai\n").replace(
        "projects:",
        "  local:\n    <<: *openai\n    kind: openai-compatible\n    base_url: http://127.0.0.1:9999\n    hosts: []\nprojects:",
    )

    rules = load_rules(write(tmp_path, text))

    assert rules.providers["local"].address == ("127.0.0.1", 9999)
    assert rules.providers["local"].key_env == "OPENAI_API_KEY"


def test_flush_interval_above_one_second(tmp_path):
    text = MINIMAL.format(digest="e" * 64) + "logging:\n  flush_interval: 5\n"

    with pytest.raises(RulesError, match=r"^logging\.flush_interval: is above 1 second"):
        load_rules(write(tmp_path, text))


def test_duplicate_intercepted_host(tmp_path):
    text = MINIMAL.format(digest="f" * 64).replace(
        "projects:",
        "  other:\n    kind: openai\n    base_url: http://127.0.0.1:1\n    key_env: OTHER_KEY\nprojects:",
    )

    with pytest.raises(RulesError, match=r"providers\.other\.hosts: is already intercepted for provider 'openai'"):
        load_rules(write(tmp_path, text))


def test_invalid_yaml(tmp_path):
    with pytest.raises(RulesError, match="is not valid YAML"):
        load_rules(write(tmp_path, "providers: [unclosed\n"))


def test_missing_file(tmp_path):
    with pytest.raises(RulesError, match="cannot be read"):
        load_rules(tmp_path / "absent.yaml")


def test_project_key_env_unset_has_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("TH_UNSET_KEY", raising=False)
    text = MINIMAL.format(digest="0" * 64).replace("key_sha256: " + "0" * 64, "key_env: TH_UNSET_KEY")

    rules = load_rules(write(tmp_path, text))

    assert rules.projects["alpha"].key_sha256 is None
    assert rules.projects["alpha"].key_env == "TH_UNSET_KEY"
