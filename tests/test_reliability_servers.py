"""Issue 15, case 9: the compose stack starts only with real passwords, and both servers ask for one.

Docker Compose is not available here, so the compose file is checked statically: its ``${VAR...}`` interpolation is
evaluated with the subset of Compose's rules the file uses (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``,
``$$``), with and without the variables of an env file; the ``check-secrets`` script is run with ``sh``. Where
``docker compose`` exists, ``docker compose config`` is run too.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY")
STRONG = {"POSTGRES_PASSWORD": "pg-3f9a1c7e5b2d", "MLFLOW_DB_PASSWORD": "mldb-8e4c2a6f0b1d",
          "PREFECT_AUTH_STRING": "mergeflow:pf-5d7b9e1a3c2f", "MLFLOW_ADMIN_PASSWORD": "ml-2c4e6a8b0d1f",
          "MLFLOW_FLASK_SERVER_SECRET_KEY": "sk-9b7d5f3e1a2c4e6f"}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of one value with ``env`` (as ``docker compose config`` does, for the forms the stack
    uses); a required variable unset or empty raises MissingVariable with its message."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        value = env.get(name)
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("?") and empty:
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op.endswith("-") and empty:
            return arg
        return value or ""

    parts = text.split("$$")
    for part in parts:
        assert not re.search(r"\$(?!\{)", part), f"a bare $ in a compose value: {part[:80]!r}"
    return "$".join(_VARIABLE.sub(one, part) for part in parts)


def _walk(node: Any, fn: Any) -> Any:
    """``node`` with ``fn`` applied to every string value (Compose interpolates values, never keys or comments)."""
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def raw_values() -> list[str]:
    found: list[str] = []
    _walk(yaml.safe_load(COMPOSE.read_text()), found.append)
    return found


def variables() -> list[re.Match[str]]:
    return [m for value in raw_values() for part in value.split("$$") for m in _VARIABLE.finditer(part)]


def stack(env: dict[str, str]) -> dict[str, Any]:
    return _walk(yaml.safe_load(COMPOSE.read_text()), lambda v: interpolate(v, env))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in (dict(i.split("=", 1) for i in env) if isinstance(env, list) else env).items()}


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_every_secret_is_required_and_has_no_default() -> None:
    uses = [(m["name"], m["op"]) for m in variables()]
    for name in SECRETS:
        assert (name, ":?") in uses, f"{name} is never required"
    for name, op in uses:
        if name in SECRETS or re.search(r"PASSWORD|SECRET|AUTH", name):
            assert op == ":?", f"${{{name}{op or ''}...}}: a secret must be required, never defaulted"
    # the old defaults are gone, as literals too
    text = "\n".join(raw_values())
    for literal in (":-prefect", ":-mlflow", "prefect:prefect@", "mlflow:mlflow@"):
        assert literal not in text


def test_without_an_env_file_compose_stops_naming_the_variable() -> None:
    with pytest.raises(MissingVariable, match=r"set \w+ .*in infra/\.env"):
        stack({})
    for name in SECRETS:
        partial = {k: v for k, v in STRONG.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            stack(partial)
        with pytest.raises(MissingVariable, match=name):  # empty counts as missing (the example's blanks)
            stack({**partial, name: ""})
    example = env_file(INFRA / ".env.example")
    with pytest.raises(MissingVariable):  # the example copied as is does not start
        stack(example)


def test_services_get_the_passwords_and_servers_ask_for_them() -> None:
    services = stack(STRONG)["services"]
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == STRONG["POSTGRES_PASSWORD"]
    assert environment(services["mlflow-db"])["POSTGRES_PASSWORD"] == STRONG["MLFLOW_DB_PASSWORD"]
    prefect = environment(services["prefect-server"])
    assert f"prefect:{STRONG['POSTGRES_PASSWORD']}@postgres:5432/" in prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == STRONG["PREFECT_AUTH_STRING"]
    command = [str(c) for c in services["mlflow"]["command"]]
    assert command[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in command
    assert any(f"mlflow:{STRONG['MLFLOW_DB_PASSWORD']}@mlflow-db:5432/" in c for c in command)
    mlflow = environment(services["mlflow"])
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"] == STRONG["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"  # the one non-secret default
    assert mlflow["MLFLOW_FLASK_SERVER_SECRET_KEY"] == STRONG["MLFLOW_FLASK_SERVER_SECRET_KEY"]


def test_mlflow_auth_config_ships_in_the_image_without_a_password() -> None:
    services = stack(STRONG)["services"]
    path = environment(services["mlflow"])["MLFLOW_AUTH_CONFIG_PATH"]
    assert path.startswith("/opt/mergeflow/")  # MERGEFLOW_PROJECT_DIR: the image copies the repository there
    config = configparser.ConfigParser()
    assert config.read(ROOT / path.removeprefix("/opt/mergeflow/"))
    section = config["mlflow"]
    assert "admin_password" not in section  # from MLFLOW_AUTH_ADMIN_PASSWORD only
    assert section["default_permission"] in ("READ", "NO_PERMISSIONS")
    database = section["database_uri"]
    assert database.startswith("sqlite:////")
    mounts = dict(v.split(":", 1) for v in services["mlflow"]["volumes"])
    auth_dir = Path(database.removeprefix("sqlite:///")).parent.as_posix()
    assert mounts.get("mlflow-auth") == auth_dir, "the user store must persist on its own volume"
    assert not auth_dir.startswith(mounts["mlflow-artifacts"]), "the artifact proxy would serve the password hashes"
    assert "mlflow-auth" in stack(STRONG)["volumes"]


def test_workers_and_setup_carry_the_credentials() -> None:
    services = stack({**STRONG, "MLFLOW_ADMIN_USERNAME": "ops"})["services"]
    server_auth = environment(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"]
    mlflow = environment(services["mlflow"])
    for name in ("worker-cpu", "worker-gpu", "setup"):
        assert environment(services[name])["PREFECT_API_AUTH_STRING"] == server_auth, name
    for name in ("worker-cpu", "worker-gpu"):
        env = environment(services[name])
        assert env["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_ADMIN_USERNAME"] == "ops"
        assert env["MLFLOW_TRACKING_PASSWORD"] == mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    # the health checks stay unauthenticated endpoints (Prefect and MLflow exempt exactly these)
    assert any("/api/health" in str(p) for p in services["prefect-server"]["healthcheck"]["test"])
    assert any("5000/health" in str(p) for p in services["mlflow"]["healthcheck"]["test"])


def _check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    service = stack(STRONG)["services"]["check-secrets"]
    command = [str(c) for c in service["command"]]
    assert command[:2] == ["sh", "-c"]
    return subprocess.run(["sh", "-c", command[2]], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("POSTGRES_PASSWORD", "prefect", "well-known default"),
    ("MLFLOW_DB_PASSWORD", "mlflow", "well-known default"),
    ("MLFLOW_ADMIN_PASSWORD", "Password", "well-known default"),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "s3cret", "shorter than 12"),
    ("PREFECT_AUTH_STRING", "admin:admin", "well-known default"),
    ("PREFECT_AUTH_STRING", "no-user-and-password-here", "must be user:password"),
    ("PREFECT_AUTH_STRING", "mergeflow:", "must be user:password"),
])
def test_check_secrets_refuses_default_and_short_passwords(name: str, value: str, says: str) -> None:
    assert _check_secrets(STRONG).returncode == 0
    result = _check_secrets({**STRONG, name: value})
    assert result.returncode == 1 and says in result.stderr
    assert name in result.stderr or "PREFECT_AUTH_STRING" in result.stderr


def test_nothing_starts_before_the_secrets_are_checked() -> None:
    services = stack(STRONG)["services"]
    assert set(environment(services["check-secrets"])) == set(SECRETS)
    for database in ("postgres", "mlflow-db"):
        assert services[database]["depends_on"]["check-secrets"]["condition"] == "service_completed_successfully"
    # the servers wait for their databases and the workers for the servers: every service waits for the check
    for name in ("prefect-server", "mlflow"):
        assert set(services[name]["depends_on"]) & {"postgres", "mlflow-db"}
    assert "profiles" not in services["check-secrets"]  # runs with a plain `up`


def test_env_example_names_every_required_variable_and_no_value() -> None:
    example = env_file(INFRA / ".env.example")
    required = {m["name"] for m in variables() if m["op"] == ":?"}
    assert required == set(SECRETS)
    assert required <= set(example)
    assert all(example[name] == "" for name in SECRETS), "the example must not suggest a password"
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "infra/.env" in ignored
    assert "infra/.env" in (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    readme = (INFRA / "README.md").read_text()
    for name in (*SECRETS, "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert name in readme


def test_image_has_what_the_basic_auth_app_needs() -> None:
    dockerfile = (INFRA / "worker.Dockerfile").read_text()
    install = next(line for line in dockerfile.splitlines() if '".[all]"' in line)
    assert re.search(r"flask-wtf==[\d.]+", install) and re.search(r"wtforms==[\d.]+", install)
    assert "/mlauth" in dockerfile and re.search(r"chown -R mergeflow:mergeflow [^\n]*/mlauth", dockerfile)


def _docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _docker_compose(), reason="docker compose is not installed")
def test_docker_compose_config(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "MLFLOW_ADMIN_USERNAME"}
    base = ["docker", "compose", "-f", str(COMPOSE), "--project-directory", str(tmp_path), "config", "--quiet"]
    refused = subprocess.run(base, env=clean, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "infra/.env" in refused.stderr
    env = tmp_path / "stack.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in STRONG.items()))
    accepted = subprocess.run([*base[:3], str(COMPOSE), "--env-file", str(env), *base[4:]], env=clean,
                              capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr
