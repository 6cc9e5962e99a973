"""Routing configs: parsing, inheritance, validation paths, the `fallbacks:` section and routes in the rules.

Providers are real `Provider` objects from `parse_rules`, and nothing here opens a connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.route_rules import (
    DEFAULT_RETRY_STATUSES,
    MAX_TARGETS,
    ConfigError,
    FallbackSettings,
    Retry,
    RouteMatch,
    parse_config,
    parse_fallbacks,
    parse_match,
)
from addons.rules import Rules, RulesError, parse_rules

CLAUDE = "claude-sonnet-4-20250514"
GPT = "gpt-4o"

PORTKEY_EXAMPLE = {
    "strategy": {"mode": "fallback"},
    "targets": [
        {"provider": "anthropic", "override_params": {"model": CLAUDE}},
        {"provider": "openai", "override_params": {"model": GPT}},
    ],
}


def base_raw(**sections) -> dict:
    """Return the parsed YAML of a rules file with four providers and two projects."""
    raw = {
        "providers": {
            "openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"},
            "anthropic": {"kind": "anthropic", "base_url": "https://api.anthropic.com", "key_env": "ANTHROPIC_API_KEY"},
            # Named apart from its kind, so that a config naming the kind has to find it by kind.
            "azure-east": {"kind": "azure", "base_url": "https://east.example.invalid", "key_env": "AZURE_API_KEY"},
            "groq": {
                "kind": "openai-compatible",
                "base_url": "https://groq.example.invalid/openai",
                "key_env": "GROQ_API_KEY",
            },
        },
        "projects": {
            "alpha": {"key_env": "TH_ROUTE_TEST_ALPHA_KEY"},
            "beta": {"key_env": "TH_ROUTE_TEST_BETA_KEY"},
        },
    }
    raw.update(sections)
    return raw


def make_rules(**sections) -> Rules:
    return parse_rules(base_raw(**sections), base_dir=Path("/nonexistent/rules-dir"))


@pytest.fixture(scope="module")
def providers():
    return make_rules().providers


def config_error(spec, providers) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(spec, providers)
    return info.value


# -- parse_config: shapes ---------------------------------------------------------------------------


def test_portkey_example_two_leaves(providers):
    config = parse_config(PORTKEY_EXAMPLE, providers)

    assert config.option == "config"
    assert config.mode == "fallback"
    assert config.is_leaf is False
    assert config.on_status_codes is None
    assert len(config.targets) == 2
    first, second = config.targets
    assert first.option == "config.targets[0]"
    assert first.provider is providers["anthropic"]
    assert first.model == CLAUDE
    assert first.override_params == {"model": CLAUDE}
    assert first.is_leaf is True
    assert second.option == "config.targets[1]"
    assert second.provider is providers["openai"]
    assert second.model == GPT
    assert second.override_params == {"model": GPT}
    assert config.leaves() == [first, second]


def test_portkey_example_leaf_defaults(providers):
    first = parse_config(PORTKEY_EXAMPLE, providers).targets[0]

    assert first.weight == 1.0
    assert first.retry is None
    assert first.request_timeout is None
    assert first.mode is None
    assert first.on_status_codes is None
    assert first.targets == ()


def test_model_shorthand(providers):
    leaf = parse_config({"provider": "openai", "model": GPT}, providers)

    assert leaf.option == "config"
    assert leaf.model == GPT
    assert leaf.override_params == {"model": GPT}
    assert leaf.leaves() == [leaf]


def test_model_shorthand_beats_override_params(providers):
    leaf = parse_config(
        {"provider": "openai", "model": GPT, "override_params": {"model": "gpt-4o-mini", "temperature": 0.3}},
        providers,
    )

    assert leaf.model == GPT
    assert leaf.override_params == {"model": GPT, "temperature": 0.3}


def test_non_string_model_param(providers):
    # A model that is not a string stays in override_params, but `model` returns None for it.
    leaf = parse_config({"provider": "openai", "override_params": {"model": 5}}, providers)

    assert leaf.model is None
    assert leaf.override_params == {"model": 5}


def test_leaf_without_provider(providers):
    leaf = parse_config({"model": GPT}, providers)

    assert leaf.provider is None
    assert leaf.model == GPT


def test_nested_option_names(providers):
    spec = {
        "strategy": {"mode": "fallback"},
        "targets": [
            {
                "strategy": {"mode": "loadbalance"},
                "targets": [{"provider": "openai", "weight": 2}, {"provider": "anthropic", "weight": 0.5}],
            },
            {"provider": "groq"},
        ],
    }
    config = parse_config(spec, providers)

    inner = config.targets[0]
    assert inner.option == "config.targets[0]"
    assert inner.mode == "loadbalance"
    assert inner.weight == 1.0
    assert [leaf.option for leaf in config.leaves()] == [
        "config.targets[0].targets[0]",
        "config.targets[0].targets[1]",
        "config.targets[1]",
    ]
    assert [leaf.weight for leaf in config.leaves()] == [2.0, 0.5, 1.0]
    assert [leaf.provider.name for leaf in config.leaves()] == ["openai", "anthropic", "groq"]


def test_where_does_not_change_options(providers):
    config = parse_config(PORTKEY_EXAMPLE, providers, where="routes.main")

    assert [leaf.option for leaf in config.leaves()] == ["config.targets[0]", "config.targets[1]"]


def test_strategy_status_codes_kept(providers):
    spec = {"strategy": {"mode": "fallback", "on_status_codes": [429, 503]}, "targets": [{"provider": "openai"}]}

    assert parse_config(spec, providers).on_status_codes == frozenset({429, 503})


def test_ignored_portkey_members_accepted(providers):
    spec = {"provider": "openai", "cache": {"mode": "simple"}, "virtual_key": "vk", "api_key": "k", "name": "n"}
    leaf = parse_config(spec, providers)

    assert leaf.provider is providers["openai"]
    assert leaf.override_params == {}


# -- parse_config: inheritance ----------------------------------------------------------------------


def test_child_override_params_win(providers):
    spec = {
        "strategy": {"mode": "fallback"},
        "override_params": {"model": "parent-model", "temperature": 0.2, "max_tokens": 100},
        "targets": [
            {"provider": "openai", "override_params": {"model": GPT, "temperature": 0.9}},
            {"provider": "anthropic"},
        ],
    }
    first, second = parse_config(spec, providers).leaves()

    assert first.override_params == {"model": GPT, "temperature": 0.9, "max_tokens": 100}
    assert second.override_params == {"model": "parent-model", "temperature": 0.2, "max_tokens": 100}


def test_child_params_leave_parent_alone(providers):
    parent_params = {"model": "parent-model"}
    spec = {
        "strategy": {"mode": "fallback"},
        "override_params": parent_params,
        "targets": [{"provider": "openai", "model": GPT}, {"provider": "anthropic"}],
    }
    first, second = parse_config(spec, providers).leaves()

    assert first.model == GPT
    assert second.model == "parent-model"
    assert parent_params == {"model": "parent-model"}


def test_retry_and_timeout_inherited(providers):
    spec = {
        "strategy": {"mode": "fallback"},
        "retry": {"attempts": 3, "on_status_codes": [429]},
        "request_timeout": 1500,
        "targets": [
            {"provider": "openai"},
            {"provider": "anthropic", "retry": {"attempts": 1}, "request_timeout": 250},
        ],
    }
    first, second = parse_config(spec, providers).leaves()

    assert first.retry == Retry(attempts=3, on_status_codes=frozenset({429}), use_retry_after=True)
    assert first.request_timeout == 1.5
    assert second.retry == Retry(attempts=1, on_status_codes=DEFAULT_RETRY_STATUSES, use_retry_after=True)
    assert second.request_timeout == 0.25


def test_inheritance_through_two_levels(providers):
    spec = {
        "strategy": {"mode": "fallback"},
        "request_timeout": 20000,
        "provider": "anthropic",
        "targets": [
            {
                "strategy": {"mode": "single"},
                "retry": {"attempts": 2, "use_retry_after_header": False},
                "targets": [{"model": CLAUDE}],
            },
        ],
    }
    config = parse_config(spec, providers)
    (leaf,) = config.leaves()

    assert leaf.option == "config.targets[0].targets[0]"
    assert leaf.provider is providers["anthropic"]
    assert leaf.request_timeout == 20.0
    assert leaf.retry == Retry(attempts=2, on_status_codes=DEFAULT_RETRY_STATUSES, use_retry_after=False)
    # Nodes carry no leaf settings of their own: they only pass them down.
    assert config.provider is None
    assert config.request_timeout is None
    assert config.retry is None


@pytest.mark.parametrize(
    ("milliseconds", "seconds"),
    [(1, 0.001), (250, 0.25), (1500, 1.5), (20000, 20.0), (2500.5, 2.5005)],
)
def test_request_timeout_ms_to_seconds(providers, milliseconds, seconds):
    leaf = parse_config({"provider": "openai", "request_timeout": milliseconds}, providers)

    assert leaf.request_timeout == seconds
    assert type(leaf.request_timeout) is float


def test_child_provider_overrides_parent(providers):
    spec = {
        "strategy": {"mode": "fallback"},
        "provider": "anthropic",
        "targets": [{"model": CLAUDE}, {"provider": "openai", "model": GPT}],
    }
    first, second = parse_config(spec, providers).leaves()

    assert first.provider is providers["anthropic"]
    assert second.provider is providers["openai"]


# -- parse_config: providers by kind ----------------------------------------------------------------


def test_provider_by_kind_name(providers):
    leaf = parse_config({"provider": "azure", "model": GPT}, providers)

    assert leaf.provider is providers["azure-east"]


def test_portkey_azure_openai_name(providers):
    leaf = parse_config({"provider": "azure-openai"}, providers)

    assert leaf.provider is providers["azure-east"]


def test_provider_kind_openai_compatible(providers):
    leaf = parse_config({"provider": "openai-compatible"}, providers)

    assert leaf.provider is providers["groq"]


def test_provider_name_before_kind():
    raw = base_raw()
    # A provider named "openai" that is not of kind openai, and one of kind openai under another name.
    raw["providers"] = {
        "openai": {"kind": "openai-compatible", "base_url": "https://compat.example.invalid", "key_env": "COMPAT_KEY"},
        "real-openai": {"kind": "openai", "base_url": "https://api.openai.com", "key_env": "OPENAI_API_KEY"},
    }
    providers = parse_rules(raw, base_dir=Path("/nonexistent/rules-dir")).providers

    assert parse_config({"provider": "openai"}, providers).provider is providers["openai"]


# -- parse_config: validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        (
            {"strategy": {"mode": "roundrobin"}, "targets": [{"provider": "openai"}]},
            "config.strategy.mode",
            "must be one of fallback, loadbalance, single, got 'roundrobin'",
        ),
        (
            {"strategy": {}, "targets": [{"provider": "openai"}]},
            "config.strategy.mode",
            "got None",
        ),
        (
            {"targets": [{"provider": "openai"}]},
            "config.strategy",
            "must be an object",
        ),
        (
            {"strategy": {"mode": "fallback", "retries": 2}, "targets": [{"provider": "openai"}]},
            "config.strategy.retries",
            "is not a strategy member",
        ),
        (
            {"strategy": {"mode": "fallback"}, "targets": []},
            "config.targets",
            "must be a non-empty list of targets, got []",
        ),
        (
            {"strategy": {"mode": "fallback"}, "targets": {"provider": "openai"}},
            "config.targets",
            "must be a non-empty list of targets",
        ),
        (
            {"strategy": {"mode": "fallback"}},
            "config.strategy",
            "needs targets",
        ),
        (
            {"provider": "openai", "modle": GPT},
            "config.modle",
            "is not a config member",
        ),
        (
            {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}, {"provider": "openai", "foo": 1}]},
            "config.targets[1].foo",
            "is not a config member",
        ),
        (
            {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}, "openai"]},
            "config.targets[1]",
            "must be an object, got 'openai'",
        ),
        (
            {"provider": "openai", "model": ""},
            "config.model",
            "must be a model name, got ''",
        ),
        (
            {"provider": "openai", "override_params": ["model"]},
            "config.override_params",
            "must be an object",
        ),
        (
            {"provider": 7},
            "config.provider",
            "must be a string, got 7",
        ),
    ],
)
def test_config_error_paths(providers, spec, path, words):
    error = config_error(spec, providers)

    assert error.path == path
    assert str(error).startswith(path)
    assert words in error.problem


@pytest.mark.parametrize("attempts", [-1, 6, 2.5, True, "3"])
def test_retry_attempts_out_of_range(providers, attempts):
    spec = {
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "openai"}, {"provider": "anthropic", "retry": {"attempts": attempts}}],
    }
    error = config_error(spec, providers)

    assert error.path == "config.targets[1].retry.attempts"
    assert error.problem == f"must be a whole number from 0 to 5, got {attempts!r}"


@pytest.mark.parametrize("attempts", [0, 5])
def test_retry_attempts_bounds_accepted(providers, attempts):
    leaf = parse_config({"provider": "openai", "retry": {"attempts": attempts}}, providers)

    assert leaf.retry.attempts == attempts


def test_retry_without_attempts(providers):
    leaf = parse_config({"provider": "openai", "retry": {}}, providers)

    assert leaf.retry == Retry(attempts=0, on_status_codes=DEFAULT_RETRY_STATUSES, use_retry_after=True)


@pytest.mark.parametrize(
    ("retry", "path", "words"),
    [
        ({"attempts": 2, "backoff": 1}, "config.retry.backoff", "is not a retry member"),
        ({"attempts": 2, "use_retry_after_header": "yes"}, "config.retry.use_retry_after_header", "must be true or false"),
        (3, "config.retry", "must be an object"),
    ],
)
def test_retry_member_errors(providers, retry, path, words):
    error = config_error({"provider": "openai", "retry": retry}, providers)

    assert error.path == path
    assert words in error.problem


@pytest.mark.parametrize("code", [99, 600, 0, True, "429", 429.0])
def test_bad_retry_status_code(providers, code):
    spec = {"provider": "openai", "retry": {"attempts": 1, "on_status_codes": [429, code]}}
    error = config_error(spec, providers)

    assert error.path == "config.retry.on_status_codes"
    assert error.problem == f"contains {code!r}, which is not an HTTP status from 100 to 599"


@pytest.mark.parametrize("codes", [[], 503, None])
def test_status_codes_not_a_list(providers, codes):
    spec = {"strategy": {"mode": "fallback", "on_status_codes": codes}, "targets": [{"provider": "openai"}]}
    error = config_error(spec, providers)

    assert error.path == "config.strategy.on_status_codes"
    assert "must be a non-empty list of HTTP statuses" in error.problem


def test_bad_strategy_status_code(providers):
    spec = {"strategy": {"mode": "fallback", "on_status_codes": [503, 700]}, "targets": [{"provider": "openai"}]}
    error = config_error(spec, providers)

    assert error.path == "config.strategy.on_status_codes"
    assert error.problem == "contains 700, which is not an HTTP status from 100 to 599"


@pytest.mark.parametrize("weight", [-1, -0.5, "2", None, False])
def test_bad_weight(providers, weight):
    spec = {
        "strategy": {"mode": "loadbalance"},
        "targets": [{"provider": "openai"}, {"provider": "anthropic", "weight": weight}],
    }
    error = config_error(spec, providers)

    assert error.path == "config.targets[1].weight"
    assert error.problem == f"must be a number of 0 or more, got {weight!r}"


def test_loadbalance_all_weights_zero(providers):
    spec = {
        "strategy": {"mode": "loadbalance"},
        "targets": [{"provider": "openai", "weight": 0}, {"provider": "anthropic", "weight": 0}],
    }
    error = config_error(spec, providers)

    assert error.path == "config.targets"
    assert "needs at least one target with a weight above 0" in error.problem


def test_fallback_all_weights_zero_ok(providers):
    # Weights matter to loadbalance only, so a fallback over weight-0 targets is valid.
    spec = {
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "openai", "weight": 0}, {"provider": "anthropic", "weight": 0}],
    }

    assert [leaf.weight for leaf in parse_config(spec, providers).leaves()] == [0.0, 0.0]


def test_unknown_provider(providers):
    spec = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}, {"provider": "mistral"}]}
    error = config_error(spec, providers)

    assert error.path == "config.targets[1].provider"
    assert error.problem == "is not a provider of the rules"
    assert error.value == "mistral"
    assert str(error) == (
        "config.targets[1].provider is not a provider of the rules (got 'mistral'). "
        "Use one of: openai, anthropic, azure-east, groq."
    )


@pytest.mark.parametrize("timeout", [0, -5, "1000", True, None])
def test_bad_request_timeout(providers, timeout):
    error = config_error({"provider": "openai", "request_timeout": timeout}, providers)

    assert error.path == "config.request_timeout"
    assert error.problem == f"must be a positive number of milliseconds, got {timeout!r}"


def test_max_targets_accepted(providers):
    spec = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}] * MAX_TARGETS}

    assert len(parse_config(spec, providers).leaves()) == 32


def test_too_many_targets(providers):
    spec = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai"}] * (MAX_TARGETS + 1)}
    error = config_error(spec, providers)

    assert error.path == "config.targets[32]"
    assert error.problem == "a config may have at most 32 targets"


def test_too_many_nested_targets(providers):
    # 17 + 17 leaves: the 33rd leaf overall is the 16th of the second group.
    group = {"strategy": {"mode": "loadbalance"}, "targets": [{"provider": "openai"}] * 17}
    error = config_error({"strategy": {"mode": "fallback"}, "targets": [group, group]}, providers)

    assert error.path == "config.targets[1].targets[15]"


def test_error_path_uses_where(providers):
    spec = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai", "retry": {"attempts": 9}}]}
    with pytest.raises(ConfigError) as info:
        parse_config(spec, providers, where="routes.main")

    assert info.value.path == "routes.main.targets[0].retry.attempts"


# -- needs_relay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"provider": "openai"}, False),
        ({"provider": "openai", "model": GPT, "override_params": {"temperature": 0}}, False),
        ({"provider": "openai", "retry": {"attempts": 0}}, False),
        ({"provider": "openai", "retry": {"attempts": 1}}, True),
        ({"provider": "openai", "request_timeout": 1000}, True),
        ({"strategy": {"mode": "single"}, "targets": [{"provider": "openai"}]}, True),
        (PORTKEY_EXAMPLE, True),
    ],
)
def test_needs_relay(providers, spec, expected):
    assert parse_config(spec, providers).needs_relay is expected


# -- parse_fallbacks --------------------------------------------------------------------------------


def test_fallbacks_defaults():
    settings = parse_fallbacks(None)

    assert settings == FallbackSettings()
    assert settings.backoff_initial == 0.5
    assert settings.backoff_max == 8.0
    assert settings.retry_after_max == 30.0
    assert settings.breaker_failures == 5
    assert settings.breaker_cooldown == 30.0
    assert settings.connect_timeout == 10.0


def test_fallbacks_empty_mapping():
    assert parse_fallbacks({}) == FallbackSettings()


def test_fallbacks_values():
    settings = parse_fallbacks(
        {
            "backoff_initial": 0,
            "backoff_max": 2,
            "retry_after_max": 0,
            "breaker_failures": 3,
            "breaker_cooldown": 12.5,
            "connect_timeout": 4,
        }
    )

    assert settings == FallbackSettings(
        backoff_initial=0.0,
        backoff_max=2.0,
        retry_after_max=0.0,
        breaker_failures=3,
        breaker_cooldown=12.5,
        connect_timeout=4.0,
    )
    assert type(settings.backoff_max) is float


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ([1, 2], "fallbacks", "must be a mapping"),
        ({"backoff": 1}, "fallbacks.backoff", "is not a known setting"),
        ({"backoff_initial": -0.1}, "fallbacks.backoff_initial", "got -0.1"),
        ({"retry_after_max": -1}, "fallbacks.retry_after_max", "got -1"),
        ({"backoff_max": 0}, "fallbacks.backoff_max", "must be greater than 0 seconds, got 0"),
        ({"breaker_cooldown": 0}, "fallbacks.breaker_cooldown", "got 0"),
        ({"connect_timeout": -2}, "fallbacks.connect_timeout", "got -2"),
        ({"connect_timeout": True}, "fallbacks.connect_timeout", "got True"),
        ({"breaker_failures": 0}, "fallbacks.breaker_failures", "must be a whole number of 1 or more, got 0"),
        ({"breaker_failures": 2.5}, "fallbacks.breaker_failures", "got 2.5"),
        ({"breaker_failures": True}, "fallbacks.breaker_failures", "got True"),
        (
            {"backoff_initial": 4, "backoff_max": 2},
            "fallbacks.backoff_max",
            "(2.0) must not be below backoff_initial (4.0)",
        ),
        # backoff_max keeps its default of 8 seconds here.
        ({"backoff_initial": 9}, "fallbacks.backoff_max", "(8.0) must not be below backoff_initial (9.0)"),
    ],
)
def test_fallbacks_errors(spec, path, words):
    with pytest.raises(ConfigError) as info:
        parse_fallbacks(spec)

    assert info.value.path == path
    assert words in info.value.problem


@pytest.mark.parametrize("value", ["fast", None, [1]])
def test_fallbacks_non_number_value(value):
    with pytest.raises(ConfigError) as info:
        parse_fallbacks({"backoff_max": value})

    assert info.value.path == "fallbacks.backoff_max"


# -- routes in the rules ----------------------------------------------------------------------------


def test_rules_without_routes():
    rules = make_rules()

    assert rules.routes == {}
    assert rules.fallbacks == FallbackSettings()
    assert rules.route_for("anthropic", CLAUDE, "alpha") is None


def test_rules_route_parsed():
    rules = make_rules(
        routes={
            "claude-to-gpt": {
                "match": {"provider": "anthropic", "model": CLAUDE},
                **PORTKEY_EXAMPLE,
            },
        },
        fallbacks={"breaker_failures": 2, "backoff_max": 1},
    )

    route = rules.routes["claude-to-gpt"]
    assert route.name == "claude-to-gpt"
    assert route.match == RouteMatch(providers=("anthropic",), models=(CLAUDE,), projects=())
    assert route.provider == "anthropic"
    assert route.override_params == {"model": CLAUDE}
    assert [leaf.option for leaf in route.config.leaves()] == ["config.targets[0]", "config.targets[1]"]
    assert [leaf.provider for leaf in route.config.leaves()] == [rules.providers["anthropic"], rules.providers["openai"]]
    assert rules.fallbacks == FallbackSettings(breaker_failures=2, backoff_max=1.0)


def test_route_without_provider():
    rules = make_rules(routes={"slow": {"model": GPT, "request_timeout": 60000}})

    route = rules.routes["slow"]
    assert route.provider is None
    assert route.match is None
    assert route.config.request_timeout == 60.0


def route_rules() -> Rules:
    return make_rules(
        routes={
            # Chosen by name only: a route without match never applies by itself.
            "named-only": {"provider": "groq"},
            "alpha-claude": {"match": {"project": "alpha", "model": [CLAUDE, "claude-haiku-4-5"]}, "provider": "anthropic"},
            "any-anthropic": {"match": {"provider": ["anthropic", "azure-east"]}, "provider": "openai", "model": GPT},
            "beta-all": {"match": {"project": ["beta"]}, "provider": "groq"},
        }
    )


def test_route_for_first_match_wins():
    rules = route_rules()

    assert rules.route_for("anthropic", CLAUDE, "alpha").name == "alpha-claude"
    assert rules.route_for("anthropic", "claude-haiku-4-5", "alpha").name == "alpha-claude"
    # beta-all matches too, but any-anthropic comes first in the file.
    assert rules.route_for("anthropic", CLAUDE, "beta").name == "any-anthropic"
    assert rules.route_for("azure-east", GPT, None).name == "any-anthropic"
    assert rules.route_for("openai", GPT, "beta").name == "beta-all"


def test_route_for_no_match():
    rules = route_rules()

    assert rules.route_for("openai", "claude-3-opus", "alpha") is None
    assert rules.route_for("openai", GPT, "alpha") is None
    assert rules.route_for("openai", GPT, None) is None
    assert rules.route_for("groq", "llama-3", "alpha") is None
    assert rules.route_for(None, None, None) is None


def test_route_for_file_order():
    rules = make_rules(
        routes={
            "second-by-name": {"match": {"model": GPT}, "provider": "openai"},
            "first-by-name": {"match": {"model": GPT}, "provider": "anthropic"},
        }
    )

    assert rules.route_for("openai", GPT, "alpha").name == "second-by-name"


def test_match_all_three_members():
    rules = make_rules(
        routes={"narrow": {"match": {"provider": "openai", "model": GPT, "project": "alpha"}, "provider": "groq"}}
    )

    assert rules.route_for("openai", GPT, "alpha").name == "narrow"
    assert rules.route_for("anthropic", GPT, "alpha") is None
    assert rules.route_for("openai", "gpt-4o-mini", "alpha") is None
    assert rules.route_for("openai", GPT, "beta") is None
    assert rules.route_for("openai", GPT, None) is None


def rules_error(**sections) -> RulesError:
    with pytest.raises(RulesError) as info:
        make_rules(**sections)
    return info.value


def test_unknown_match_project():
    error = rules_error(routes={"r": {"match": {"project": "gamma"}, "provider": "openai"}})

    assert error.key == "routes.r.match.project"
    assert str(error) == "routes.r.match.project: is not in the rules (got 'gamma'). Use one of: alpha, beta."


def test_unknown_match_provider():
    error = rules_error(routes={"r": {"match": {"provider": ["openai", "mistral"]}, "provider": "openai"}})

    assert error.key == "routes.r.match.provider"
    assert str(error) == "routes.r.match.provider: is not in the rules (got 'mistral'). Use one of: openai, anthropic, azure-east, groq."


@pytest.mark.parametrize(
    ("match", "key", "words"),
    [
        ({}, "routes.r.match", "is empty"),
        ({"team": "x"}, "routes.r.match.team", "is not a match member"),
        ({"model": ["gpt-4o", ""]}, "routes.r.match.model", "must be a name or a list of names"),
        ({"model": 4}, "routes.r.match.model", "must be a name or a list of names"),
        ("gpt-4o", "routes.r.match", "must be an object"),
    ],
)
def test_match_errors(match, key, words):
    error = rules_error(routes={"r": {"match": match, "provider": "openai"}})

    assert error.key == key
    assert words in str(error)


def test_route_config_error_key():
    error = rules_error(
        routes={
            "main": {
                "strategy": {"mode": "fallback"},
                "targets": [{"provider": "openai"}, {"provider": "anthropic", "retry": {"attempts": 6}}],
            }
        }
    )

    assert error.key == "routes.main.targets[1].retry.attempts"
    assert "must be a whole number from 0 to 5, got 6" in str(error)


def test_bad_route_name():
    error = rules_error(routes={"bad name": {"provider": "openai"}})

    assert error.key == "routes.bad name"


def test_fallbacks_error_key():
    error = rules_error(fallbacks={"breaker_failures": 0})

    assert error.key == "fallbacks.breaker_failures"


def test_parse_match_directly(providers):
    projects = make_rules().projects
    match = parse_match({"provider": "openai", "model": [GPT, "gpt-4o-mini"]}, "m", providers, projects)

    assert match == RouteMatch(providers=("openai",), models=(GPT, "gpt-4o-mini"), projects=())
    assert match.matches("openai", "gpt-4o-mini", "anything") is True
    assert match.matches("openai", "gpt-4.1", "anything") is False


def test_nesting_limit(providers):
    spec: dict = {"provider": "openai"}
    for _ in range(8):
        spec = {"strategy": {"mode": "fallback"}, "targets": [spec]}
    assert len(parse_config(spec, providers).leaves()) == 1

    deeper = {"strategy": {"mode": "fallback"}, "targets": [spec]}
    error = config_error(deeper, providers)
    assert error.path == "config" + ".targets[0]" * 9
    assert error.problem == "is nested too deeply; a config may nest targets at most 8 levels"


@pytest.mark.parametrize("timeout", [3_600_001, 1e308])
def test_request_timeout_limit(providers, timeout):
    error = config_error({"provider": "openai", "request_timeout": timeout}, providers)
    assert error.path == "config.request_timeout"
    assert error.problem == f"must be at most 3600000 milliseconds (one hour), got {timeout!r}"


def test_request_timeout_at_limit(providers):
    assert parse_config({"provider": "openai", "request_timeout": 3_600_000}, providers).request_timeout == 3600.0
