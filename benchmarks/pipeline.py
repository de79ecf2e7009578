"""Pipeline benchmark: a cold run of the merge pipeline on the full zoo, a warm re-run with one changed merge knob,
and the cost of Prefect + MLflow over calling the library directly.

    python benchmarks/pipeline.py [--recipe recipes/zoo-ta-apl.yaml] [--knob parameters.lambda=0.8] [--json OUT]
                                  [--scenarios fresh,present] [--repeat N] [--no-embedded]

Each run is a fresh Python process timed from outside (imports included, as a user pays them):
  1. library: ``mergeflow.graph.run_pipeline(recipe, register=False)`` on empty caches (no Prefect, no MLflow);
  2. flow, cold: ``flows.merge_pipeline`` against a Prefect server and an MLflow store that already run (as in
     production: the benchmark starts a local ``prefect server`` on 127.0.0.1 and creates the SQLite store before
     timing), empty caches;
  3. flow, warm: the same flow again with one merge knob changed (caches of run 2 kept).
in two scenarios: "fresh machine" (nothing cached at all: the resolve stage acquires the checkpoints; for zoo
references that is building the zoo, the offline stand-in for downloading from the hub) and "checkpoints present"
(the zoo linked into each run's MERGEFLOW_HOME as if downloaded earlier; the content-hash memo is not, so resolve
hashes the checkpoints like any new ones). Then, for information, the flow cold with the checkpoints present on
Prefect's ephemeral API and a new MLflow store: what ``make demo`` pays.
Targets, per scenario: warm ≤ 20 % of cold; (flow cold − library) ≤ 15 % of library. With ``--repeat N`` each
scenario is measured N times on fresh homes and the figures are the mean, with their standard deviation: one run of
the "checkpoints present" scenario is ~30 s dominated by evaluation, and a single ratio moves by several percent
from run to run on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# mergeflow is imported inside the functions: the timed child processes run this file, and each must pay only
# the imports of its own run (the library's, or the flow's), not the zoo builder's and the planner's on top.


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    from mergeflow.pipeline import expand_grid

    (_, point), = expand_grid(data, {dotted: [value]})
    data.clear()
    data.update(point)


def _recipe(path: Path, knob: str | None) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    data.pop("grid", None)
    if knob:
        key, raw = knob.split("=", 1)
        _set(data, key, yaml.safe_load(raw))
    return data


def _child(mode: str, recipe_file: Path) -> int:
    """Run inside a fresh process: the library alone, or the flow."""
    recipe = json.loads(recipe_file.read_text())
    if mode == "library":
        from mergeflow.graph import run_pipeline

        out = run_pipeline(recipe, register=False, device="auto")
        print(json.dumps({"in_domain_avg": out["evaluation"].in_domain_avg}))
    else:
        from flows.merge_pipeline import merge_pipeline  # Prefect: the library child must not pay its import

        out = merge_pipeline(recipe)
        print(json.dumps({"in_domain_avg": out["in_domain_avg"]}))
    return 0


def _home(root: Path, zoo_root: Path, name: str) -> Path:
    home = root / name
    (home / "zoo").mkdir(parents=True)
    (home / "zoo" / zoo_root.name).symlink_to(zoo_root)
    return home


def _timed(mode: str, recipe: dict[str, Any], home: Path, project: Path, log: Path,
           api_url: str | None = None) -> float:
    project.mkdir(parents=True, exist_ok=True)
    recipe_file = project / f"recipe-{mode}-{time.monotonic_ns()}.json"
    recipe_file.write_text(json.dumps(recipe))
    env = {**os.environ, "MERGEFLOW_HOME": str(home), "MERGEFLOW_PROJECT_DIR": str(project),
           "PREFECT_HOME": str(project / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    start = time.perf_counter()
    with log.open("a") as f:
        done = subprocess.run([sys.executable, __file__, "--child", mode, str(recipe_file)], env=env, cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {done.returncode}); see {log}")
    return seconds


@contextlib.contextmanager
def prefect_server(work: Path) -> Iterator[str]:
    """A real ``prefect server`` on 127.0.0.1 (private PREFECT_HOME), stopped with its process group at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = work / "prefect-server"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    with (work / "prefect-server.log").open("w") as log:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {work / 'prefect-server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _existing_store(project: Path) -> None:
    """Create the project's MLflow store now (a running team has one; its creation is not a pipeline cost)."""
    from mergeflow import tracking  # MLflow: the library child (register=False) must not pay its import

    project.mkdir(parents=True, exist_ok=True)
    tracking.ensure_store(f"sqlite:///{project / 'mlflow.db'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "zoo-ta-apl.yaml")
    parser.add_argument("--knob", default="parameters.lambda=0.8", help="the merge knob the warm run changes")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--scenarios", default="fresh,present",
                        help="comma-separated: fresh (nothing cached), present (checkpoints present)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each scenario this many times (fresh homes each time); mean ± std reported")
    parser.add_argument("--no-embedded", action="store_true", help="skip the informational ephemeral-API run")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child[0], Path(args.child[1]))
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"fresh", "present"} or args.repeat < 1:
        parser.error("--scenarios takes fresh and/or present; --repeat at least 1")
    from mergeflow.pipeline import as_recipe
    from mergeflow.zoo.build import build_zoo, parse_zoo_reference

    base = _recipe(args.recipe, None)
    changed = _recipe(args.recipe, args.knob)
    size, seed, _ = parse_zoo_reference(as_recipe(base).base_model or "")
    zoo = build_zoo(size=size, seed=seed)  # for the runs with the checkpoints present (built outside the timing)
    work = Path(tempfile.mkdtemp(prefix="mergeflow-bench-pipeline-"))
    log = work / "runs.log"
    load = os.getloadavg()
    print(f"recipe {args.recipe.name} on the {size} zoo (seed {seed}); load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; logs in {log}")

    def once(name: str, tag: str, home: Any, api_url: str) -> dict[str, float]:
        library = _timed("library", base, home(f"library{tag}"), work / f"project-{name}{tag}-library", log)
        print(f"  [{name}{tag}] library only, cold                    {library:6.1f} s")
        flow_home, project = home(f"flow{tag}"), work / f"project-{name}{tag}-flow"
        _existing_store(project)
        cold = _timed("flow", base, flow_home, project, log, api_url)
        print(f"  [{name}{tag}] flow (Prefect server + MLflow), cold  {cold:6.1f} s")
        warm = _timed("flow", changed, flow_home, project, log, api_url)
        print(f"  [{name}{tag}] flow, warm, {args.knob:26s}{warm:6.1f} s")
        return {"library_cold": library, "flow_cold": cold, "flow_warm": warm, "warm_over_cold": warm / cold,
                "overhead_over_library": (cold - library) / library}

    def scenario(name: str, home: Any, api_url: str) -> dict[str, Any]:
        runs = [once(name, f"-{i}" if args.repeat > 1 else "", home, api_url) for i in range(args.repeat)]
        digits = {"warm_over_cold": 3, "overhead_over_library": 3}
        out: dict[str, Any] = {k: round(statistics.mean(r[k] for r in runs), digits.get(k, 1)) for k in runs[0]}
        if args.repeat > 1:
            out["std"] = {k: round(statistics.stdev(r[k] for r in runs), digits.get(k, 1)) for k in runs[0]}
            out["runs"] = [{k: round(v, digits.get(k, 1)) for k, v in r.items()} for r in runs]
        out["targets"] = {"warm_le_20pct_of_cold": out["warm_over_cold"] <= 0.20,
                          "overhead_le_15pct_of_library": out["overhead_over_library"] <= 0.15}
        spread = (f" ± {out['std']['warm_over_cold']:.3f}", f" ± {out['std']['overhead_over_library']:.1%}") \
            if args.repeat > 1 else ("", "")
        print(f"  [{name}] warm / cold = {out['warm_over_cold']:.3f}{spread[0]} (target ≤ 0.20); Prefect + MLflow "
              f"overhead = {out['overhead_over_library']:+.1%}{spread[1]} of the library (target ≤ +15 %)"
              + (f" (mean ± std of {args.repeat})" if args.repeat > 1 else ""))
        return out

    def fresh(kind: str) -> Path:
        home = work / f"home-fresh-{kind}"
        home.mkdir()
        return home

    result: dict[str, Any] = {
        "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
        "knob": args.knob, "zoo": {"size": size, "seed": seed}, "repeat": args.repeat,
        "load_average_at_start": [round(x, 2) for x in load],
    }
    with prefect_server(work) as api_url:
        if "fresh" in scenarios:
            # nothing cached: resolve acquires the checkpoints (the zoo build stands in for the hub download)
            result["fresh_machine"] = scenario("fresh machine", fresh, api_url)
        if "present" in scenarios:
            result["checkpoints_present"] = scenario(
                "checkpoints present", lambda kind: _home(work, zoo.root, f"home-present-{kind}"), api_url)
    if not args.no_embedded:
        embedded = _timed("flow", base, _home(work, zoo.root, "home-embedded"), work / "project-embedded", log)
        print(f"  flow, cold, checkpoints present, ephemeral API + new store {embedded:6.1f} s (what make demo pays)")
        result["flow_cold_embedded_seconds"] = round(embedded, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
