"""The container files: Dockerfile, docker-compose.yml, docker/rules.yaml and .env.example.

No Docker engine runs here, so these tests read the files instead of building them: the compose
file's services, variables and volumes, and that no key is written into any of them.
`tests/test_container_story.py` runs the image's command against a client in a network namespace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from addons.rules import load_rules

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CONTAINER_RULES = REPO / "docker" / "rules.yaml"
ENV_EXAMPLE = REPO / ".env.example"

#: A compose reference to a variable that must be set: ${NAME:?message}.
REQUIRED_REFERENCE = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?[^}]+\}$")
ANY_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::?[?-][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping, so values can be checked by name"
    return {name: str(value) for name, value in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def test_compose_services(services):
    assert set(services) == {"tollhouse-ca", "tollhouse", "research", "webapp"}
    assert services["tollhouse"]["depends_on"]["tollhouse-ca"]["condition"] == "service_completed_successfully"
    for project in ("research", "webapp"):
        assert services[project]["depends_on"]["tollhouse"]["condition"] == "service_healthy"
        assert services[project]["profiles"] == ["examples"]


def test_compose_gateway_keys_from_env_file(services):
    rules = load_rules(CONTAINER_RULES)
    key_variables = {p.key_env for p in rules.providers.values()} | {p.key_env for p in rules.projects.values()}
    env = environment(services["tollhouse"])

    assert set(env) == key_variables
    for name, value in env.items():
        match = REQUIRED_REFERENCE.match(value)
        assert match, f"tollhouse: {name} must be ${{{name}:?...}}, got {value!r}"
        assert match["name"] == name


def test_compose_no_inline_secrets(services):
    for service_name, service in services.items():
        for name, value in environment(service).items():
            assert not re.search(r"sk-[A-Za-z0-9]", value), f"{service_name}: {name} holds a provider key"
            if name.endswith("_KEY"):
                assert value == "placeholder" or REQUIRED_REFERENCE.match(value), f"{service_name}: {name}={value!r}"
            credentials = re.match(r"^https?://([^@/]*)@", value)
            if credentials:
                _, _, password = credentials[1].partition(":")
                assert REQUIRED_REFERENCE.match(password), f"{service_name}: {name} has an inline password"


def test_compose_variables_in_env_example(compose):
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.MULTILINE))
    referenced = {m["name"] for m in ANY_REFERENCE.finditer(COMPOSE.read_text(encoding="utf-8"))}

    assert referenced == documented


def test_compose_proxy_project(services):
    rules = load_rules(CONTAINER_RULES)
    env = environment(services["research"])

    match = re.match(r"^http://(?P<project>[a-z]+):(?P<key>\$\{[^}]+\})@tollhouse:8080$", env["HTTPS_PROXY"])
    assert match, env["HTTPS_PROXY"]
    assert match["project"] in rules.projects
    assert REQUIRED_REFERENCE.match(match["key"])["name"] == rules.projects[match["project"]].key_env
    assert env["SSL_CERT_FILE"] == "/certs/ca-bundle.pem"
    assert services["research"]["volumes"] == ["tollhouse-certs:/certs:ro"]


def test_compose_bundle_written_to_certs(services):
    command = services["tollhouse-ca"]["command"]

    assert command[0] == "ca"
    assert command[command.index("--rules") + 1] == "/etc/tollhouse/rules.yaml"
    assert command[command.index("--bundle") + 1] == "/certs/ca-bundle.pem"
    assert set(services["tollhouse-ca"]["volumes"]) == {"tollhouse-data:/data", "tollhouse-certs:/certs"}


def test_compose_base_url_project(services):
    rules = load_rules(CONTAINER_RULES)
    env = environment(services["webapp"])

    assert env["OPENAI_BASE_URL"] == "http://tollhouse:8787/v1"
    assert env["ANTHROPIC_BASE_URL"] == "http://tollhouse:8787"
    assert REQUIRED_REFERENCE.match(env["OPENAI_API_KEY"])["name"] == rules.projects["webapp"].key_env
    assert "volumes" not in services["webapp"]
    assert "HTTPS_PROXY" not in env


def test_compose_data_volume_only_on_gateway(compose, services):
    assert set(compose["volumes"]) == {"tollhouse-data", "tollhouse-certs"}
    for name, service in services.items():
        mounts = [str(volume) for volume in service.get("volumes", [])]
        has_data = any(mount.startswith("tollhouse-data:") for mount in mounts)
        assert has_data == (name in ("tollhouse", "tollhouse-ca")), f"{name}: {mounts}"
    assert "tollhouse-data:/data" in services["tollhouse"]["volumes"]
    assert "./docker/rules.yaml:/etc/tollhouse/rules.yaml:ro" in services["tollhouse"]["volumes"]


def test_container_rules_addresses():
    rules = load_rules(CONTAINER_RULES)

    assert (rules.listen_host, rules.listen_port) == ("0.0.0.0", 8080)
    assert (rules.base_url_listen_host, rules.base_url_listen_port) == ("0.0.0.0", 8787)
    assert rules.data_dir == Path("/data")


def test_dockerfile_instructions():
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, arguments in instructions:
        by_name.setdefault(name, []).append(arguments)

    base = re.match(r"^python:3\.(\d+)-slim", by_name["FROM"][0])
    assert base and int(base[1]) >= 12, by_name["FROM"]
    assert by_name["USER"] == ["tollhouse"]
    assert by_name["EXPOSE"] == ["8080 8787"]
    assert by_name["VOLUME"] == ['["/data"]']
    assert any(re.search(r"\bpip install \.", arguments) for arguments in by_name["RUN"])
    assert "docker/rules.yaml /etc/tollhouse/rules.yaml" in by_name["COPY"]
    assert json.loads(by_name["ENTRYPOINT"][0]) + json.loads(by_name["CMD"][0]) == [
        "tollhouse", "run", "--rules", "/etc/tollhouse/rules.yaml",
    ]


def test_dockerfile_healthcheck_without_curl():
    (healthcheck,) = [arguments for name, arguments in dockerfile_instructions() if name == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD"):].strip())

    assert command[:2] == ["python", "-c"]
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck
    compile(command[2], "HEALTHCHECK", "exec")
    assert "8080" in command[2]
    assert "8787" in command[2]


def test_dockerignore_keeps_secrets_out():
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()

    for entry in (".env", "data", ".venv", ".git"):
        assert entry in ignored
