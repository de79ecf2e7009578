"""Structural checks of the deployment files: prefect.yaml, the compose stack, the worker image, the Kubernetes GPU
job template. Docker and Kubernetes cannot run here, so these files are checked for what they must contain; the
prefect.yaml deployments were also applied to a real local Prefect server (see the README)."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")  # the pattern Prefect's templating uses


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


# ---------------------------------------------------------------------------------------------------- prefect.yaml


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return _load_yaml(ROOT / "prefect.yaml")


@pytest.fixture(scope="module")
def deployments(prefect_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_yaml["deployments"]}


def _flow_functions(path: Path) -> dict[str, ast.FunctionDef]:
    """Top-level functions of a module decorated with ``@flow``/``@flow(...)``, by function name."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if name == "flow":
                    found[node.name] = node
    return found


def _flow_name(fn: ast.FunctionDef) -> str | None:
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call):
            for kw in deco.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
    return None


def test_prefect_yaml_header_and_pull_step(prefect_yaml: dict[str, Any]) -> None:
    assert prefect_yaml["name"] == "mergeflow"
    assert prefect_yaml["prefect-version"] == "3.8.8"
    # the working directory comes from the worker's environment at run time, never a path of this machine
    assert prefect_yaml["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $MERGEFLOW_PROJECT_DIR }}"}}]
    assert set(prefect_yaml["deployments"][0]) >= {"name", "entrypoint", "work_pool"}


def test_deployments_are_the_expected_four(deployments: dict[str, dict[str, Any]]) -> None:
    assert set(deployments) == {"merge-pipeline-nightly", "sweep-weekly", "importance-gpu", "evaluate-gpu"}


@pytest.mark.parametrize(("name", "flow_name"), [("merge-pipeline-nightly", "merge-pipeline"),
                                                 ("sweep-weekly", "merge-sweep"),
                                                 ("importance-gpu", "importance"),
                                                 ("evaluate-gpu", "evaluate")])
def test_entrypoints_name_existing_flows(deployments: dict[str, dict[str, Any]], name: str, flow_name: str) -> None:
    file, _, function = deployments[name]["entrypoint"].partition(":")
    path = ROOT / file
    assert path.is_file(), f"{name}: entrypoint file {file} does not exist"
    flows = _flow_functions(path)
    assert function in flows, f"{name}: no @flow function {function!r} in {file} (found {sorted(flows)})"
    # run_deployment addresses deployments as "<flow name>/<deployment name>"
    assert _flow_name(flows[function]) == flow_name


def test_parameters_match_the_flow_signatures(deployments: dict[str, dict[str, Any]]) -> None:
    for name, deployment in deployments.items():
        file, _, function = deployment["entrypoint"].partition(":")
        fn = _flow_functions(ROOT / file)[function]
        accepted = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        unknown = set(deployment.get("parameters") or {}) - accepted
        assert not unknown, f"{name}: parameters {sorted(unknown)} are not arguments of {function}"


def test_recipes_named_in_parameters_exist(deployments: dict[str, dict[str, Any]]) -> None:
    for name, deployment in deployments.items():
        recipe = (deployment.get("parameters") or {}).get("recipe")
        if recipe is not None:
            assert not Path(recipe).is_absolute(), f"{name}: recipe paths are relative to the project folder"
            assert (ROOT / recipe).is_file(), f"{name}: {recipe} does not exist"


def test_cpu_deployments_are_scheduled(deployments: dict[str, dict[str, Any]]) -> None:
    for name in ("merge-pipeline-nightly", "sweep-weekly"):
        deployment = deployments[name]
        assert deployment["work_pool"]["name"] == "cpu"
        schedules = deployment["schedules"]
        assert schedules and all(s.get("active", True) for s in schedules)
        for schedule in schedules:
            fields = schedule["cron"].split()
            assert len(fields) == 5 and schedule["timezone"] == "UTC", schedule
    assert deployments["merge-pipeline-nightly"]["schedules"][0]["cron"].split()[2:] == ["*", "*", "*"]  # daily
    assert deployments["sweep-weekly"]["schedules"][0]["cron"].split()[4] != "*"  # one day a week
    nightly = deployments["merge-pipeline-nightly"]["parameters"]
    assert nightly == {"recipe": "recipes/zoo-ta-apl.yaml", "registered_name": "mergeflow-nightly",
                       "importance_deployment": "importance/importance-gpu"}
    assert deployments["sweep-weekly"]["parameters"] == {"recipe": "recipes/zoo-sweep.yaml",
                                                         "registered_name": "mergeflow-sweep"}


def test_importance_deployment_targets_the_gpu_pool(deployments: dict[str, dict[str, Any]]) -> None:
    importance = deployments["importance-gpu"]
    assert importance["work_pool"]["name"] == "gpu"
    assert not importance.get("schedules")
    # the name the nightly pipeline hands to run_deployment points at this deployment
    target = deployments["merge-pipeline-nightly"]["parameters"]["importance_deployment"]
    assert target == "importance/importance-gpu"


def test_evaluation_deployment_targets_the_gpu_pool(deployments: dict[str, dict[str, Any]]) -> None:
    evaluate = deployments["evaluate-gpu"]
    assert evaluate["work_pool"]["name"] == "gpu"
    assert not evaluate.get("schedules") and not evaluate.get("parameters")
    # the pipelines hand their evaluate nodes to it by name: evaluation_deployment="evaluate/evaluate-gpu"
    fn = _flow_functions(ROOT / evaluate["entrypoint"].partition(":")[0])["evaluate_flow"]
    assert {"jobs", "device"} <= {a.arg for a in fn.args.args}


# ------------------------------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(INFRA / "docker-compose.yml")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow-db", "mlflow", "worker-cpu", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["worker-cpu"]


def test_compose_ports_bound_to_loopback(compose: dict[str, Any]) -> None:
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is not on 127.0.0.1"
            published.append(port)
    assert "127.0.0.1:4200:4200" in published and "127.0.0.1:5000:5000" in published


def test_compose_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "prefect-server", "mlflow-db", "mlflow"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    assert any("/api/health" in part for part in services["prefect-server"]["healthcheck"]["test"])
    assert any("/health" in part for part in services["mlflow"]["healthcheck"]["test"])
    for worker in ("worker-cpu", "worker-gpu"):
        for dependency in ("prefect-server", "mlflow"):
            assert services[worker]["depends_on"][dependency]["condition"] == "service_healthy"


def test_compose_servers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prefect_env = _environment(services["prefect-server"])
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    mlflow_cmd = _command(services["mlflow"])
    assert mlflow_cmd[:2] == ["mlflow", "server"]
    assert any(a.startswith("--backend-store-uri=postgresql://") and "@mlflow-db:5432/" in a for a in mlflow_cmd)
    destination = next(a for a in mlflow_cmd if a.startswith("--artifacts-destination="))
    assert any(v.endswith(":" + destination.split("=", 1)[1]) for v in services["mlflow"]["volumes"])
    mlflow_env = _environment(services["mlflow"])
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # MLflow 3 refuses Host headers it does not know: the name the workers use must be allowed
    allowed = mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow:5000", "127.0.0.1:*"} <= set(allowed)


def test_compose_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose["volumes"])
    assert {"prefect-db", "mlflow-db", "mlflow-artifacts", "mergeflow-cache"} <= volumes
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        service = services[name]
        command = _command(service)
        assert command[:3] == ["prefect", "worker", "start"] and command[command.index("--pool") + 1] == pool
        assert service["build"]["dockerfile"] == "infra/worker.Dockerfile"
        assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
        env = _environment(service)
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        for key in ("MERGEFLOW_HOME", "MERGEFLOW_PROJECT_DIR", "HF_HOME", "HF_HUB_OFFLINE"):
            assert env.get(key), f"{name}: {key} not set"
        # the cache volume is shared and MERGEFLOW_HOME / HF_HOME live on it
        mounts = dict(v.split(":", 1) for v in service["volumes"])
        assert mounts["mergeflow-cache"] == "/cache"
        assert env["MERGEFLOW_HOME"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    assert services["worker-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["worker-gpu"]["build"]["args"]["VARIANT"] == "cuda"


def test_compose_gpu_reservation(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert ("count" in device) != ("device_ids" in device)  # the compose spec allows one of the two
    assert "gpu" not in (compose["services"]["worker-cpu"].get("deploy") or {}).get("resources", {})


def test_compose_setup_creates_what_prefect_yaml_needs(compose: dict[str, Any]) -> None:
    script = "\n".join(_command(compose["services"]["setup"]))
    assert "work-pool create cpu --type process" in script and "work-pool create gpu --type process" in script
    assert "concurrency-limit create gpu" in script
    assert "env -u MERGEFLOW_PROJECT_DIR prefect --no-prompt deploy --all" in script


# ---------------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_installs_with_pins() -> None:
    instructions = _dockerfile_instructions(INFRA / "worker.Dockerfile")
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert len(installs) == 1, "one pip command, so torch's pin and the rest are resolved together"
    command = installs[0]
    assert "-c constraints.txt" in command
    assert "torch==2.13.0" in command and '".[all]"' in command
    assert "--extra-index-url" in command and "${TORCH_INDEX_URL}" in command
    assert any(op == "COPY" and "constraints.txt" in args for op, args in instructions)
    copied = " ".join(args for op, args in instructions if op == "COPY")
    assert "README.md" in copied  # pyproject.toml's `readme` must exist when pip builds the package


def test_dockerfile_variants() -> None:
    instructions = _dockerfile_instructions(INFRA / "worker.Dockerfile")
    froms = [args for op, args in instructions if op == "FROM"]
    assert any(f.endswith("AS base-cpu") for f in froms) and any(f.endswith("AS base-cuda") for f in froms)
    assert froms[-1].startswith("base-${VARIANT}")
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "download.pytorch.org/whl/cpu" in env and "download.pytorch.org/whl/${TORCH_CUDA}" in env
    for key in ("MERGEFLOW_PROJECT_DIR=/opt/mergeflow", "MERGEFLOW_HOME=/cache/", "HF_HOME=/cache/",
                "HF_HUB_OFFLINE="):
        assert key in env
    args = [a.split("=", 1)[0] for op, a in instructions if op == "ARG"]
    assert {"VARIANT", "HF_HUB_OFFLINE"} <= set(args)
    assert any(op == "USER" and a != "root" for op, a in instructions)
    # the compose file runs prefect and mlflow from this image: no ENTRYPOINT may swallow their commands,
    # and Kubernetes jobs override only the command (args)
    assert not any(op == "ENTRYPOINT" for op, _ in instructions)


def test_dockerignore_keeps_the_venv_out() -> None:
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile when the context is the repository root
    ignored = (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "**/__pycache__"} <= set(ignored)


# --------------------------------------------------------------------------------------- Kubernetes job template


@pytest.fixture(scope="module")
def k8s_template() -> dict[str, Any]:
    return json.loads((INFRA / "k8s" / "gpu-base-job-template.json").read_text())


def _container(template: dict[str, Any]) -> dict[str, Any]:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_k8s_template_placeholders_are_declared(k8s_template: dict[str, Any]) -> None:
    # the same rule the Prefect server applies when a work pool is created with this template
    used = set(PLACEHOLDER.findall(json.dumps(k8s_template["job_configuration"])))
    declared = set(k8s_template["variables"]["properties"])
    assert used, "no placeholders found"
    assert used <= declared, f"undeclared: {sorted(used - declared)}"
    assert not any(name.startswith("$") for name in used)


def test_k8s_template_requests_gpus(k8s_template: dict[str, Any]) -> None:
    props = k8s_template["variables"]["properties"]
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["default"] == 1
    resources = _container(k8s_template)["resources"]
    for kind in ("requests", "limits"):
        assert resources[kind]["nvidia.com/gpu"] == "{{ gpu_count }}"
    for name in ("cpu_request", "memory_request", "image", "namespace", "env"):
        assert name in props
    pod = k8s_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_k8s_template_mounts_the_shared_cache(k8s_template: dict[str, Any]) -> None:
    pod = k8s_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert "{{ cache_pvc_name }}" in claims.values()
    cache_volume = next(name for name, claim in claims.items() if claim == "{{ cache_pvc_name }}")
    mounts = {m["name"]: m["mountPath"] for m in _container(k8s_template)["volumeMounts"]}
    env = k8s_template["variables"]["properties"]["env"]["default"]
    assert env["MERGEFLOW_HOME"].startswith(mounts[cache_volume] + "/")
    assert env["HF_HOME"].startswith(mounts[cache_volume] + "/")
    assert env["MERGEFLOW_PROJECT_DIR"] == "/opt/mergeflow"  # where the image has the project (prefect.yaml pull)


def test_k8s_template_keeps_what_the_kubernetes_worker_requires(k8s_template: dict[str, Any]) -> None:
    # prefect-kubernetes refuses a manifest that lacks or changes these (KubernetesWorkerJobConfiguration)
    config = k8s_template["job_configuration"]
    manifest = config["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    container = _container(k8s_template)
    assert container["name"] == "prefect-job"
    assert container["env"] == "{{ env }}" and container["args"] == "{{ command }}"
    assert container["image"] == "{{ image }}"
    for key in ("command", "env", "labels", "name", "namespace"):
        assert config[key] == "{{ " + key + " }}"


def test_k8s_template_renders_with_prefect_templating(k8s_template: dict[str, Any]) -> None:
    """Fill the template the way a worker does (variable defaults, then a deployment's job variables)."""
    from prefect.utilities.templating import apply_values

    props = k8s_template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in props.items() if "default" in spec}
    values.update({"name": "run-1", "command": "prefect flow-run execute", "gpu_count": 2,
                   "env": {**values["env"], "EXTRA": "1"}})
    config = apply_values(k8s_template["job_configuration"], values)
    assert "{{" not in json.dumps(config)
    container = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # a whole-placeholder value keeps its type
    assert container["resources"]["requests"] == {"cpu": props["cpu_request"]["default"],
                                                  "memory": props["memory_request"]["default"], "nvidia.com/gpu": 2}
    assert "cpu" not in container["resources"]["limits"]  # no default: the key is dropped, not left empty
    assert container["image"] == props["image"]["default"] and config["namespace"] == props["namespace"]["default"]
    assert config["env"]["EXTRA"] == "1" and config["env"]["HF_HUB_OFFLINE"] == "1"
