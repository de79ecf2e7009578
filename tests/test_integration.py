"""The team deployment for real: a Prefect server, an MLflow server, ``prefect deploy --all`` and process workers.

Everything runs on 127.0.0.1 in this module's own processes (each in its own process group, killed at teardown):

* ``prefect server start`` (SQLite under a private PREFECT_HOME) and ``mlflow server`` (SQLite, proxied artifacts);
* the ``cpu`` and ``gpu`` process pools, the ``gpu`` tag concurrency limit and ``prefect --no-prompt deploy --all``
  from the project folder with MERGEFLOW_PROJECT_DIR unset, as the README says;
* ``prefect worker start --pool cpu`` and ``--pool gpu --limit 1``, whose flow runs find the project through the
  pull step (``$MERGEFLOW_PROJECT_DIR`` on the worker) and the test zoo through the session's MERGEFLOW_HOME.

Runs of ``merge-pipeline/merge-pipeline-nightly`` (parameters overridden to ``tests/recipes/zoo-test-ties*.yaml``):

A. the recipe end to end, its importance stage as a flow run of ``importance/importance-gpu`` on the gpu pool;
   checked through the Prefect API (states of the flow runs and of every stage's task runs) and the MLflow server
   (version, alias, run params, metrics, tags, description and dataset inputs; the champion resolves and loads with
   the merged model's logits, and ``mlflow models serve`` serves it: one completion, greedy, as transformers makes it);
B. the recipe with one merge knob changed (lambda), its cpu worker SIGKILLed (with the flow-run process) while the
   merge runs (held there by ``tests/merge_gate``): the registry still holds only complete versions and the champion
   has not moved. Nothing tells the server: B stays RUNNING, with its merge task run RUNNING, and keeps the
   deployment's only concurrency slot (``limit: 1, ENQUEUE`` in prefect.yaml) until its 300 s lease lapses, so the
   test marks it Crashed through the API, as an operator or a zombie-run automation would;
C. the same deployment and parameters again, on a restarted worker: it completes, what B finished is ``Cached``,
   what depends on the changed knob is computed, never served from A's cache, and the registry gains one version;
D. A's recipe evaluated on other slices (``tests/recipes/zoo-test-ties-eval.yaml``) with
   ``evaluation_deployment=evaluate/evaluate-gpu``: its evaluate stage runs as a flow run of that deployment on the
   gpu pool (on CUDA when the worker has it), everything up to the merge is served from A's cache.

Flows use ``MERGEFLOW_TASK_RUNNER=dask-threads`` (one in-process Dask worker): a local process cluster costs
seconds of start-up per flow run on a loaded 2-core machine, and the stages are the same either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.zoo_fixtures import test_zoo  # noqa: F401

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
GATE_PATH = Path(__file__).resolve().parent / "merge_gate"  # its sitecustomize.py gates the workers' merges
RECIPE = "tests/recipes/zoo-test-ties.yaml"  # relative to the project folder, as a deployment parameter is
RECIPE_CHANGED = "tests/recipes/zoo-test-ties-lambda.yaml"  # the same with lambda 1.0 -> 0.7
RECIPE_EVAL = "tests/recipes/zoo-test-ties-eval.yaml"  # the same evaluated on other slices of test and validation
MODEL = "it-pipeline"
PIPELINE = "merge-pipeline/merge-pipeline-nightly"
IMPORTANCE = "importance/importance-gpu"
EVALUATION = "evaluate/evaluate-gpu"
DEPLOYMENTS = (PIPELINE, "merge-sweep/sweep-weekly", IMPORTANCE, EVALUATION)
STAGES = ("resolve", "task_vectors", "merge", "evaluate", "register")
BIN = Path(sys.executable).parent  # the venv's scripts (prefect, mlflow) next to this interpreter
# seconds a flow run may take; raise it on a loaded machine (the runs' stages are minutes of CPU there)
RUN_TIMEOUT = float(os.environ.get("MERGEFLOW_IT_RUN_TIMEOUT", "240"))


# ----------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A server or worker started in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name} ({self.log.name}), last {n} lines ---\n" + "\n".join(lines[-n:])


def _start(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path = ROOT) -> Proc:
    log = logs / f"{name}-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    return Proc(name, popen, log)


def _kill(proc: Proc) -> None:
    """SIGKILL the process group and every descendant (a flow-run process may sit in a session of its own)."""
    import psutil

    try:
        family = psutil.Process(proc.popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    groups = {proc.popen.pid}
    for child in family:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(child.pid))
    groups.discard(os.getpgid(0))  # never our own group
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILLed; a zombie-reaping delay is not worth failing on
        proc.popen.wait(timeout=10)


def _wait_http(url: str, proc: Proc, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s\n{proc.tail()}")


# -------------------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    prefect_api: str
    mlflow_uri: str
    env: dict[str, str]  # what the CLI and the workers get
    logs: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)  # flow runs shared between the tests, in order

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(api=self.prefect_api)

    def mlflow(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def start_worker(self, pool: str, *extra: str) -> None:
        self.procs[pool] = _start(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool, *extra],
                                  self.env, self.logs)

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          mergeflow_home: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("integration")
    logs = tmp / "logs"
    logs.mkdir()
    prefect_port, mlflow_port = _free_port(), _free_port()
    # nothing of this process's Prefect/MLflow/mergeflow settings (another module may have set an API URL)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MERGEFLOW_"))}
    base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "MERGEFLOW_HOME": str(mergeflow_home), "PYTHONUNBUFFERED": "1"}
    server_home = tmp / "prefect-server"
    server_env = base | {
        "PREFECT_HOME": str(server_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{server_home}/prefect.db",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # no cron runs: a test started just before 02:00 UTC must not get the real nightly run on its worker
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        # Fewer writers on SQLite: loops this test does not use (see _sqlite_stalls)
        **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in (
            "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "EVENT_PERSISTER", "TRIGGERS")},
    }
    server_home.mkdir()
    mlflow_env = base | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    api = f"http://127.0.0.1:{prefect_port}/api"
    uri = f"http://127.0.0.1:{mlflow_port}"
    env = base | {
        "PREFECT_HOME": str(tmp / "prefect-client"), "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": uri,
        "MERGEFLOW_PROJECT_DIR": str(ROOT), "MERGEFLOW_TASK_RUNNER": "dask-threads",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick runs up within 2 s (default 10 s)
        # tests/merge_gate/sitecustomize.py: a merge waits while <gate>/hold exists (test_killed_worker_then_rerun)
        "MERGEFLOW_TEST_MERGE_GATE": str(tmp / "merge-gate"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(GATE_PATH), base.get("PYTHONPATH", "")) if p),
    }
    (tmp / "merge-gate").mkdir()
    st = Stack(api, uri, env, logs)
    try:
        st.procs["prefect-server"] = _start(
            "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(prefect_port)], server_env, logs)
        st.procs["mlflow-server"] = _start(
            "mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                              "--artifacts-destination", str(tmp / "artifacts")], mlflow_env, logs)
        request.getfixturevalue("test_zoo")  # built (or found) while the servers start
        _wait_http(f"{api}/health", st.procs["prefect-server"], 120)
        _wait_http(f"{uri}/health", st.procs["mlflow-server"], 120)
        _setup_deployments(st)
        st.start_worker("cpu")
        st.start_worker("gpu", "--limit", "1")
        yield st
    finally:
        for proc in reversed(list(st.procs.values())):  # workers first, then the servers
            _kill(proc)
        _sqlite_stalls(logs)


def _sqlite_stalls(logs: Path) -> None:
    """Warn about "database is locked" errors in the Prefect server's log.

    Prefect 3.8.8 on SQLite, with two workers polling and flow runs reporting, now and then blocks every writer for
    its hard-coded 60 s busy timeout (seen here: flow runs picked up two minutes late). The runs still complete, so
    it costs time, not correctness; the warning says why a slow run was slow.
    """
    import warnings

    for log in logs.glob("prefect-server-*.log"):
        text = log.read_text(errors="replace")
        if "database is locked" in text:
            stalls = re.findall(r"ERROR +\| docket\.dependencies - \S+ \[ *(\d+)ms\]", text)
            warnings.warn(f"Prefect server on SQLite: {text.count('database is locked')} 'database is locked' "
                          f"lines; slow docket jobs (ms): {stalls}", stacklevel=1)


def _setup_deployments(st: Stack) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with st.client() as client:
        for pool in ("cpu", "gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    deploy_env = {k: v for k, v in st.env.items() if k != "MERGEFLOW_PROJECT_DIR"}
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=ROOT, env=deploy_env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect deploy --all failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    with st.client() as client:
        for name in DEPLOYMENTS:
            dep = client.read_deployment_by_name(name)
            # deployed without MERGEFLOW_PROJECT_DIR: the template is kept, each worker fills in its own folder
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $MERGEFLOW_PROJECT_DIR }}"}}], dep.pull_steps
        pipeline_dep = client.read_deployment_by_name(PIPELINE)
        assert pipeline_dep.work_pool_name == "cpu"
        assert pipeline_dep.global_concurrency_limit.limit == 1
        assert pipeline_dep.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert client.read_deployment_by_name(IMPORTANCE).work_pool_name == "gpu"
        assert client.read_deployment_by_name(EVALUATION).work_pool_name == "gpu"
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1


# --------------------------------------------------------------------------------------------- Prefect reads


def _stage(task_run: Any) -> str:
    """A task run's stage: "resolve zoo:test/base" -> resolve, "register-f31" -> register; the placeholder task run
    ``run_deployment`` adds for a deployment's subflow (a random name, a task key ending in the deployment's
    slugified name) -> "importance/importance-gpu" or "evaluate/evaluate-gpu"."""
    if task_run.task_key.startswith("prefect.deployments.flow_runs.run_deployment."):
        return EVALUATION if task_run.task_key.endswith("evaluate-evaluate-gpu") else IMPORTANCE
    return re.sub(r"-[0-9a-f]+$", "", task_run.name.split(" ")[0])


def _task_runs(client: Any, flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _create_run(st: Stack, recipe: str, **extra: Any) -> Any:
    with st.client() as client:
        dep = client.read_deployment_by_name(PIPELINE)
        return client.create_flow_run_from_deployment(dep.id, parameters={
            "recipe": recipe, "registered_name": MODEL, "importance_deployment": IMPORTANCE, **extra})


def _wait_final(st: Stack, flow_run_id: UUID, timeout: float = RUN_TIMEOUT) -> Any:
    """The flow run once final, and once every task run it has is final too (task states arrive as events)."""
    deadline = time.monotonic() + timeout
    with st.client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                if run.state.type.value != "COMPLETED":
                    break
                trs = _task_runs(client, flow_run_id)
                if all(tr.state and tr.state.is_final() for tr in trs):
                    return run
            time.sleep(0.5)
        run = client.read_flow_run(flow_run_id)
    raise AssertionError(f"flow run {run.name} ({flow_run_id}): {run.state.type.value if run.state else None} "
                         f"{run.state.message if run.state else ''}\n{st.tails()}")


def _task_result(task_run: Any) -> Any:
    """A task run's persisted result, read from the result file its state points at (under MERGEFLOW_HOME)."""
    from prefect.results import ResultRecord

    data = task_run.state.data
    key = data.get("storage_key") if isinstance(data, dict) else data.storage_key
    return ResultRecord.deserialize(Path(key).read_bytes()).result


def _slots(client: Any) -> int:
    """Slots held now in the pipeline deployment's concurrency limit (limit 1)."""
    return client.read_deployment_by_name(PIPELINE).global_concurrency_limit.active_slots


def _importance_run(client: Any, flow_run_id: UUID, deployment: str = IMPORTANCE) -> Any:
    """The flow run of the importance (or another) deployment that ``flow_run_id`` started as its subflow."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    parents = [tr.id for tr in _task_runs(client, flow_run_id) if _stage(tr) == deployment]
    assert len(parents) == 1, "; ".join(tr.name for tr in _task_runs(client, flow_run_id))
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_task_run_id=FlowRunFilterParentTaskRunId(any_=parents)))
    assert len(runs) == 1, runs
    return runs[0]


def _name(task_run: Any) -> str:
    """The task run's name without the random suffix of tasks that have no run name ("register-f31" -> register),
    so runs of one flow can be compared by name."""
    stage = _stage(task_run)
    return task_run.name if " " in task_run.name else stage


def _states(task_runs: list[Any]) -> dict[str, str]:
    """Task-run name (e.g. "resolve zoo:test/base", "evaluate test") -> state name (Completed, Cached, Running)."""
    out = {}
    for tr in task_runs:
        assert _name(tr) not in out, f"two task runs named {_name(tr)}"
        out[_name(tr)] = tr.state.name if tr.state else "None"
    return out


def _by_stage(states: dict[str, str], task_runs: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tr in task_runs:
        out.setdefault(_stage(tr), []).append(states[_name(tr)])
    return out


# ---------------------------------------------------------------------------------------------- MLflow reads


def _versions(st: Stack) -> list[Any]:
    return sorted(st.mlflow().search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def _champion(st: Stack) -> str:
    return str(st.mlflow().get_registered_model(MODEL).aliases["champion"])


@pytest.fixture
def registry_client(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This process pointed at the MLflow server (what ``resolve("models:/...")`` reads), restored afterwards."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return stack


def _merged_folder(home: Path, recipe_hash: str, model_hash: str) -> Path:
    """The merged model in mergeflow's content-addressed cache with this recipe hash and these weights."""
    from mergeflow.checkpoints import resolve

    found = [d / "model" for d in sorted((home / "cache" / "merged_model").iterdir())
             if (d / "model" / "mergeflow.json").is_file()
             and json.loads((d / "model" / "mergeflow.json").read_text())["recipe_hash"] == recipe_hash
             and resolve(d / "model", scan_finite=False).content_hash == model_hash]
    assert len(found) == 1, found
    return found[0]


def _logits(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = (torch.arange(3, 35) % model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


def _check_every_version_complete(st: Stack) -> None:
    """Every registered version downloads from the server and resolves as a complete model."""
    from mergeflow.checkpoints import resolve

    for v in _versions(st):
        assert v.status == "READY", v
        snap = resolve(f"models:/{MODEL}/{v.version}")
        assert snap.content_hash == v.tags["mergeflow.model_hash"], v.version


# ---------------------------------------------------------------------------------------------------- tests


def test_pipeline_deployment_on_workers(stack: Stack) -> None:
    """Run A through the deployments: every stage COMPLETED, importance as a flow run on the gpu pool."""
    run = _create_run(stack, RECIPE)
    stack.runs["A"] = run.id
    done = _wait_final(stack, run.id)
    assert done.work_pool_name == "cpu" and done.state.type.value == "COMPLETED"
    assert done.parameters["recipe"] == RECIPE and done.parameters["registered_name"] == MODEL
    with stack.client() as client:
        trs = _task_runs(client, run.id)
        states = _states(trs)
        by_stage = _by_stage(states, trs)
        for stage in STAGES:
            assert by_stage.get(stage), f"no {stage} task run in {sorted(states)}"
            assert all(s in ("Completed", "Cached") for s in by_stage[stage]), (stage, states)
        assert all(tr.state.type.value == "COMPLETED" for tr in trs), states
        assert len(by_stage["resolve"]) == 4 and len(by_stage["task_vectors"]) == 3
        assert len(by_stage["merge"]) == 1 and len(by_stage["register"]) == 1
        assert sorted(n for n in states if n.startswith("evaluate")) == ["evaluate test", "evaluate validation"]
        assert "importance" not in by_stage  # it ran in the other flow run, not here
        [merge_run] = [tr for tr in trs if _stage(tr) == "merge"]
        stack.runs["A merge"] = _task_result(merge_run)  # the merge stage's manifest (path, content hash)
        assert _slots(client) == 0

        imp = _importance_run(client, run.id)
        assert imp.id != run.id and imp.state.type.value == "COMPLETED", imp.state
        assert imp.deployment_id == client.read_deployment_by_name(IMPORTANCE).id and imp.work_pool_name == "gpu"
        imp_states = _states(_task_runs(client, imp.id))
        # the Sens sensitivities measured expert by expert (one task each), then finalized by the entry's task
        assert sorted(n for n in imp_states if n.startswith("importance")) == ["importance sens"] + [
            f"importance_measure sens sensitivity experts [{i}]" for i in range(3)], imp_states
        assert all(s in ("Completed", "Cached") for s in imp_states.values()), imp_states
        assert client.read_concurrency_limit_by_tag("gpu").active_slots == []  # the gpu slot was given back


def test_registered_in_mlflow_and_champion_loads(registry_client: Stack, mergeflow_home: Path) -> None:
    """Run A in the MLflow server: one version, the champion, params/metrics/tags; it loads with the same logits."""
    import torch

    from mergeflow.checkpoints import resolve
    from mergeflow.recipe import load_recipe

    st = registry_client
    if "A" not in st.runs:
        pytest.skip("run A did not happen")
    client = st.mlflow()
    versions = _versions(st)
    assert [v.version for v in versions] == ["1"]
    assert _champion(st) == "1"
    run = client.get_run(versions[0].run_id)
    recipe_hash = load_recipe(ROOT / RECIPE).recipe_hash()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mergeflow.recipe_hash"] == recipe_hash == versions[0].tags["mergeflow.recipe_hash"]
    assert run.data.tags["mergeflow.flow_run_id"] == str(st.runs["A"])
    assert run.data.tags["mergeflow.input.zoo_test/base"].startswith("sha256:")
    assert run.data.params["merge_method"] == "ties" and float(run.data.params["parameters.lambda"]) == 1.0
    assert run.data.params["models.0.model"] == "zoo:test/topic"
    for metric in ("test_in_domain_avg", "test_acc_topic", "selection_validation_in_domain_avg"):
        assert 0.0 <= run.data.metrics[metric] <= 100.0, metric
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"evaluation", "coefficients"}
    assert [o.model_id for o in run.outputs.model_outputs] == [versions[0].source.removeprefix("models:/")]

    champion = resolve(f"models:/{MODEL}@champion")
    model_hash = versions[0].tags["mergeflow.model_hash"]
    assert champion.content_hash == model_hash
    merged = _merged_folder(mergeflow_home, recipe_hash, model_hash)
    manifest = st.runs["A merge"]
    assert Path(manifest.path) == merged and manifest.content_hash == model_hash
    assert champion.path != merged  # a download from the server, not the cache folder itself
    assert torch.equal(_logits(champion.path), _logits(merged))

    # what a registry user sees and gets: the method in the description, the evaluation data as dataset inputs, and
    # the champion served by `mlflow models serve` from the server's registry
    assert versions[0].description.startswith("ties (") and "selection validation_in_domain_avg = " in \
        versions[0].description, versions[0].description
    assert re.fullmatch(r"models:/m-[0-9a-f]+", versions[0].source), versions[0].source  # the run's logged model
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"topic/test[:40]", "topic/validation[:20]"}, \
        [d.dataset.name for d in run.inputs.dataset_inputs]
    prompt = "the"
    from transformers import pipeline

    expected = pipeline("text-generation", model=str(merged))(prompt, max_new_tokens=4, do_sample=False,
                                                              return_full_text=False)[0]["generated_text"]
    assert _serve_champion(st, prompt, max_new_tokens=4) == expected


def _serve_champion(st: Stack, prompt: str, *, max_new_tokens: int) -> str:
    """``mlflow models serve -m models:/MODEL@champion --env-manager local`` on 127.0.0.1: one completion, then the
    server's process group is killed."""
    import httpx

    port = _free_port()
    # mlflow starts the scoring server as `uvicorn` found on PATH: the venv's, as with an activated venv
    env = st.env | {"PATH": os.pathsep.join([str(BIN), st.env.get("PATH", "")])}
    proc = _start("mlflow-models-serve", [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                  env, st.logs)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, 180)
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                           json={"inputs": [prompt], "params": {"max_new_tokens": max_new_tokens}})
        assert reply.status_code == 200, f"{reply.status_code} {reply.text}\n{proc.tail()}"
        [text] = reply.json()["predictions"]
        return text
    finally:
        _kill(proc)


def test_killed_worker_then_rerun(registry_client: Stack) -> None:
    """Runs B (killed with its worker while merging) and C (same parameters, completes)."""
    from prefect.states import Crashed

    st = registry_client
    if "A" not in st.runs:
        pytest.skip("run A did not happen")
    champion_before = _champion(st)

    # B: one merge knob changed, so the merge is new; kill the cpu worker (and its flow-run process) mid-run.
    # The merge waits at the gate (tests/merge_gate) until the kill: a tiny merge, its evaluation and registration
    # can all finish between two polls of the API, whose task-run states arrive later than the flow run's.
    gate = Path(st.env["MERGEFLOW_TEST_MERGE_GATE"])
    (gate / "hold").write_text("held by test_killed_worker_then_rerun\n")
    try:
        run_b = _create_run(st, RECIPE_CHANGED)
        deadline = time.monotonic() + RUN_TIMEOUT
        with st.client() as client:
            while not (reached := sorted(gate.glob("reached-*"))) and time.monotonic() < deadline:
                state = client.read_flow_run(run_b.id).state
                assert not (state and state.is_final()), f"run B ended {state.name} before its merge\n{st.tails()}"
                time.sleep(0.2)
        assert reached, f"run B never reached its merge\n{st.tails()}"
        # the merge task run's Running state travels as an event: wait until the server has it (the merge is held)
        seen = None
        with st.client() as client:
            while seen is None and time.monotonic() < deadline:
                seen = next((f"{tr.name}: {tr.state.name}" for tr in _task_runs(client, run_b.id)
                             if _stage(tr) == "merge" and tr.state and tr.state.type.value == "RUNNING"), None)
                time.sleep(0.2)
        assert seen, f"run B's merge task run never showed Running on the server\n{st.tails()}"
        _kill(st.procs.pop("cpu"))
    finally:
        (gate / "hold").unlink()
    time.sleep(2.0)  # let any last event land; nothing is left to send one

    with st.client() as client:
        b = client.read_flow_run(run_b.id)
        b_trs = _task_runs(client, run_b.id)
        b_states = _states(b_trs)
        b_importance = _importance_run(client, run_b.id)
        b_imp_states = _states(_task_runs(client, b_importance.id))
    observed_b = b.state.name
    print(f"killed the cpu worker at {seen!r}; run B is then {observed_b}; its task runs: {b_states}")
    # Nobody tells the server: the run stays RUNNING (no heartbeat watchdog is configured) and keeps the
    # deployment's one concurrency slot (prefect.yaml: limit 1, ENQUEUE) until its 300 s lease lapses.
    assert b.state.type.value == "RUNNING", b.state
    with st.client() as client:
        assert _slots(client) == 1
    by_stage_b = _by_stage(b_states, b_trs)
    # B reused what the changed knob does not touch, and computed the merge (it was not in A's cache)
    assert by_stage_b["resolve"] == ["Cached"] * 4 and by_stage_b["task_vectors"] == ["Cached"] * 3, b_states
    assert all(s != "Cached" for s in by_stage_b["merge"] + by_stage_b.get("evaluate", [])), b_states
    assert b_importance.state.type.value == "COMPLETED" and set(b_imp_states.values()) == {"Cached"}, b_imp_states
    assert "register" not in by_stage_b, b_states

    # the registry points at nothing partial and the champion did not move
    assert [v.version for v in _versions(st)] == ["1"]
    _check_every_version_complete(st)
    assert _champion(st) == champion_before

    # What an operator (or a zombie-run automation) does: mark the run Crashed, which frees its slot.
    with st.client() as client:
        client.set_flow_run_state(run_b.id, Crashed(message="worker killed by the integration test"), force=True)
        assert client.read_flow_run(run_b.id).state.type.value == "CRASHED"
        assert _slots(client) == 0

    # C: the same deployment and parameters on a restarted worker
    st.start_worker("cpu")
    run_c = _create_run(st, RECIPE_CHANGED)
    c = _wait_final(st, run_c.id)
    assert c.state.type.value == "COMPLETED"
    with st.client() as client:
        c_trs = _task_runs(client, run_c.id)
        c_states = _states(c_trs)
        c_importance = _importance_run(client, run_c.id)
        c_imp_states = _states(_task_runs(client, c_importance.id))
    print(f"run C task runs: {c_states}; its importance flow run: {c_imp_states}")
    finished_in_b = {n for n, s in b_states.items() if s in ("Completed", "Cached") and not n.startswith(IMPORTANCE)}
    for name, state in c_states.items():
        if name.startswith(IMPORTANCE):
            continue
        # what B finished is served from the cache; what it did not finish is computed now
        assert state == ("Cached" if name in finished_in_b else "Completed"), (name, state, b_states, c_states)
    by_stage_c = _by_stage(c_states, c_trs)
    for stage in STAGES:
        assert by_stage_c.get(stage), (stage, c_states)
    assert by_stage_c["resolve"] == ["Cached"] * 4 and by_stage_c["task_vectors"] == ["Cached"] * 3
    assert by_stage_c["register"] == ["Completed"], c_states
    assert c_importance.work_pool_name == "gpu" and set(c_imp_states.values()) == {"Cached"}, c_imp_states

    # exactly one new version, for the new model, complete; the alias follows the promotion rule
    versions = _versions(st)
    assert [v.version for v in versions] == ["1", "2"]
    new = versions[1]
    client = st.mlflow()
    assert client.get_run(new.run_id).data.tags["mergeflow.flow_run_id"] == str(run_c.id)
    assert float(client.get_run(new.run_id).data.params["parameters.lambda"]) == 0.7
    [c_merge] = [tr for tr in c_trs if _stage(tr) == "merge"]
    assert new.tags["mergeflow.model_hash"] == _task_result(c_merge).content_hash
    assert new.tags["mergeflow.model_hash"] != versions[0].tags["mergeflow.model_hash"]
    _check_every_version_complete(st)
    metric = "mergeflow.selection.validation_in_domain_avg"
    old_value, new_value = float(versions[0].tags[metric]), float(new.tags[metric])
    assert _champion(st) == ("2" if new_value > old_value else "1"), (old_value, new_value)
    # B left no run behind that claims to be finished
    experiment = client.get_run(new.run_id).info.experiment_id
    b_runs = client.search_runs([experiment], f"tags.`mergeflow.flow_run_id` = '{run_b.id}'")
    assert b_runs == [], b_runs


def test_evaluation_deployment_on_the_gpu_pool(registry_client: Stack) -> None:
    """Run D: the evaluate stage as a flow run of evaluate/evaluate-gpu on the gpu pool, the rest from A's cache."""
    import torch

    st = registry_client
    if "A" not in st.runs:
        pytest.skip("run A did not happen")
    run = _create_run(st, RECIPE_EVAL, evaluation_deployment=EVALUATION)
    done = _wait_final(st, run.id)
    assert done.work_pool_name == "cpu" and done.state.type.value == "COMPLETED"
    with st.client() as client:
        trs = _task_runs(client, run.id)
        states = _states(trs)
        by_stage = _by_stage(states, trs)
        assert "evaluate" not in by_stage, states  # it ran in the other flow run, not here
        assert by_stage["resolve"] == ["Cached"] * 4 and by_stage["task_vectors"] == ["Cached"] * 3, states
        assert by_stage["merge"] == ["Cached"] and by_stage["register"] == ["Completed"], states
        evaluation = _importance_run(client, run.id, EVALUATION)
        assert evaluation.deployment_id == client.read_deployment_by_name(EVALUATION).id
        assert evaluation.work_pool_name == "gpu" and evaluation.state.type.value == "COMPLETED", evaluation.state
        ev_trs = _task_runs(client, evaluation.id)
        ev_states = _states(ev_trs)
        # new slices: computed there, on CUDA when the gpu worker has one
        assert ev_states == {"evaluate test": "Completed", "evaluate validation": "Completed"}, ev_states
        results = {tr.name: _task_result(tr) for tr in ev_trs}
        assert results["evaluate test"].limit == 30 and results["evaluate validation"].limit == 15
        assert {r.device for r in results.values()} == {"cuda" if torch.cuda.is_available() else "cpu"}
        [reg] = [tr for tr in trs if _stage(tr) == "register"]
        registration = _task_result(reg)
    # the same weights as A: the registry already holds them (version 1), so nothing new is registered
    assert registration.model_hash == st.runs["A merge"].content_hash
    assert registration.version == "1" and registration.reused
    assert [v.version for v in _versions(st)] == ["1", "2"]
