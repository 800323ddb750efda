"""docker-compose.yml, checked against the project because no Docker engine runs here.

Services, ports, commands, environment variables, mounted files and search
attributes must all exist on the project's side, and the vmflow environment
must load as valid `Settings`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from vmflow.cli.main import app
from vmflow.config import Settings, load_settings
from vmflow.gateway.settings import GatewaySettings
from workflows import contract

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VMFLOW_IMAGE = "vmflow:latest"
EXPECTED_SERVICES = {
    "postgresql",
    "temporal",
    "temporal-search-attributes",
    "temporal-ui",
    "jaeger",
    "otel-collector",
    "vmflow-migrate",
    "vmflow-api",
    "vmflow-worker",
    "vmflow-gateway",
}
# Read with os.environ.get outside Settings: by worker.py and `vmflow api serve`.
EXTRA_VMFLOW_VARIABLES = {"VMFLOW_LOG_LEVEL"}
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::?[?-](?P<rest>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def _interpolate(value: str) -> str:
    """Replace `${NAME:?message}` and `${NAME:-default}` the way Compose would, with samples."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if ":-" in text:
            return match.group("rest")
        return f"sample-{match.group('name').lower()}"

    return _INTERPOLATION.sub(replace, value)


def _vmflow_environment(compose: dict[str, Any]) -> dict[str, str]:
    return {key: _interpolate(str(value)) for key, value in compose["x-vmflow-environment"].items()}


def _command(service: dict[str, Any]) -> Any:
    """Resolve a vmflow service's `command` to the click command the CLI runs for it."""
    command: Any = typer.main.get_command(app)
    arguments = list(service["command"])
    # Groups keep their subcommands by name; a leaf command has no `commands`.
    while getattr(command, "commands", None) and arguments:
        name = arguments.pop(0)
        assert name in command.commands, f"`vmflow {' '.join(service['command'])}`: no {name!r}"
        command = command.commands[name]
    return command


def _option(service: dict[str, Any], flag: str) -> str | None:
    arguments = list(service.get("command", []))
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    published = []
    for mapping in service.get("ports", []):
        host, host_port, container_port = str(mapping).split(":")
        published.append((host, int(host_port), int(container_port)))
    return published


def test_compose_defines_production_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_compose_dependencies_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", []):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def test_compose_publishes_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host, _, _ in _published(service):
            assert host == "127.0.0.1", f"{name} publishes on {host}"


def test_compose_vmflow_commands_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("image") != VMFLOW_IMAGE or "command" not in service:
            continue
        command = _command(service)
        known = {option for parameter in command.params for option in parameter.opts}
        for argument in service["command"]:
            if argument.startswith("--"):
                assert argument in known, f"{name}: `{argument}` is not an option of {command}"


def test_compose_worker_module_exists(compose: dict[str, Any]) -> None:
    entrypoint = compose["services"]["vmflow-worker"]["entrypoint"]
    assert entrypoint[:2] == ["python", "-m"]
    assert importlib.util.find_spec(entrypoint[2]) is not None


def test_compose_variables_are_settings(compose: dict[str, Any]) -> None:
    known = set(Settings.model_fields) | EXTRA_VMFLOW_VARIABLES
    for name in compose["x-vmflow-environment"]:
        assert name in known, f"{name} is not a vmflow setting"

    gateway_fields = {f"VMFLOW_GATEWAY_{field.upper()}" for field in GatewaySettings.model_fields}
    for name in compose["services"]["vmflow-gateway"]["environment"]:
        assert name in gateway_fields, f"{name} is not a gateway setting"


def test_compose_environment_loads_as_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = _vmflow_environment(compose)
    for name in list(Settings.model_fields):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://vmflow:")
    assert settings.VMFLOW_API_KEY is not None


def test_compose_addresses_match_services_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    environment = _vmflow_environment(compose)

    api_port = int(_option(services["vmflow-api"], "--port") or 0)
    gateway_port = int(_option(services["vmflow-gateway"], "--port") or 0)
    assert (
        urlsplit(environment["VMFLOW_API_URL"]).hostname,
        urlsplit(environment["VMFLOW_API_URL"]).port,
    ) == ("vmflow-api", api_port)
    assert (
        urlsplit(environment["COMPUTE_GATEWAY_URL"]).hostname,
        urlsplit(environment["COMPUTE_GATEWAY_URL"]).port,
    ) == ("vmflow-gateway", gateway_port)
    assert ("127.0.0.1", api_port, api_port) in _published(services["vmflow-api"])

    temporal_host, temporal_port = environment["TEMPORAL_ADDRESS"].split(":")
    assert temporal_host in services
    assert ("127.0.0.1", int(temporal_port), int(temporal_port)) in _published(services["temporal"])
    assert (
        services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"]
        == (environment["TEMPORAL_ADDRESS"])
    )
    ui_port = int(services["temporal-ui"]["environment"]["TEMPORAL_UI_PORT"])
    assert ("127.0.0.1", 8233, ui_port) in _published(services["temporal-ui"])

    database = urlsplit(environment["DATABASE_URL"])
    assert database.hostname in services
    assert database.path.lstrip("/") == services["postgresql"]["environment"]["POSTGRES_DB"]
    assert database.username == services["postgresql"]["environment"]["POSTGRES_USER"]


def test_compose_files_exist(compose: dict[str, Any]) -> None:
    build = compose["services"]["vmflow-migrate"]["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    assert dockerfile.is_file()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"

    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_compose_collector_config_is_consistent(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in config[kind], f"pipeline uses undefined {kind[:-1]} {name}"

    environment = _vmflow_environment(compose)
    http_endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "COMPUTE_TRACE_OTLP_ENDPOINT"):
        url = urlsplit(environment[variable])
        assert url.hostname == "otel-collector"
        assert url.port == int(http_endpoint.rsplit(":", 1)[1])

    jaeger_host = config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert jaeger_host in compose["services"]
    assert compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_compose_registers_contract_search_attributes(compose: dict[str, Any]) -> None:
    script = compose["services"]["temporal-search-attributes"]["command"][0]
    names = set(re.search(r"for name in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    assert names == {key.name for key in contract.SEARCH_ATTRIBUTES}
