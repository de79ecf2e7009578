"""Code from a recipe (issue 15, case 8): which zoo task files lm-eval may load.

lm-eval imports the module a task YAML names with ``!function``, merges the files it names with ``include:`` and
renders its templates unsandboxed, so a zoo folder is code. The policy (mergeflow.evaluation's docstring): a zoo
under MERGEFLOW_HOME/zoo is read as data; a folder elsewhere only when its task files are mergeflow's own; anything
else needs --trust-task-code / evaluation.trust_task_code; even trusted, nothing may reach outside the zoo folder.
Each hostile task file here imports a module that writes a marker file, so "refused" means "the marker is absent".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergeflow import graph, pipeline
from mergeflow.errors import TaskCodeError
from mergeflow.evaluation import check_task_code, evaluate_path, trusted_zoo_dir
from mergeflow.manifests import ResolvedModel
from mergeflow.recipe import EvaluationSpec
from mergeflow.zoo import Zoo
from tests.zoo_fixtures import test_zoo  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK_FILE = "tasks/zoo_topic.yaml"


def copy_zoo(zoo: Zoo, dest: Path) -> Path:
    """The zoo's manifest and task folder (data and task files; the models are not needed to evaluate with it)."""
    dest.mkdir(parents=True)
    shutil.copy2(zoo.root / "zoo.json", dest / "zoo.json")
    shutil.copytree(zoo.tasks_dir, dest / "tasks")
    return dest


def plant(folder: Path, marker: Path, module: str = "evil") -> None:
    """A module beside the task files that leaves ``marker`` when imported, and a pass-through process_docs."""
    (folder / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n\n"
        "def process_docs(dataset):\n    return dataset\n")


def edit_task(zoo_dir: Path, **entries: str) -> None:
    """Add raw YAML lines (``key: value``, tags kept) to the topic task file."""
    path = zoo_dir / TASK_FILE
    path.write_text(path.read_text() + "".join(f"{k}: {v}\n" for k, v in entries.items()))


@pytest.fixture
def hostile(test_zoo: Zoo, tmp_path: Path) -> tuple[Path, Path]:  # noqa: F811
    """A zoo folder outside MERGEFLOW_HOME/zoo whose topic task imports evil.py (beside it) with !function."""
    zoo_dir = copy_zoo(test_zoo, tmp_path / "elsewhere" / "zoo")
    marker = tmp_path / "marker"
    plant(zoo_dir / "tasks", marker)
    edit_task(zoo_dir, process_docs="!function evil.process_docs")
    return zoo_dir, marker


def test_task_code_outside_the_zoo_cache_is_refused_without_opt_in(test_zoo: Zoo, hostile) -> None:  # noqa: F811
    zoo_dir, marker = hostile
    with pytest.raises(TaskCodeError, match=r"runs code \(!function evil.process_docs\).*--trust-task-code"):
        evaluate_path(test_zoo.base, ["topic"], zoo=zoo_dir, limit=5)
    assert not marker.exists()
    # the CLI: one line, exit 2, nothing imported
    from mergeflow.zoo.commands import eval_command

    res = CliRunner().invoke(eval_command, [str(test_zoo.base), "--tasks", "topic", "--limit", "5",
                                            "--zoo", str(zoo_dir)])
    assert res.exit_code == 2 and "--trust-task-code" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not marker.exists()


def test_task_code_runs_with_the_opt_in(test_zoo: Zoo, hostile, tmp_path: Path) -> None:  # noqa: F811
    zoo_dir, marker = hostile
    from mergeflow.zoo.commands import eval_command

    out = tmp_path / "scores.json"
    res = CliRunner().invoke(eval_command, [str(test_zoo.base), "--tasks", "topic", "--limit", "5",
                                            "--zoo", str(zoo_dir), "--trust-task-code", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert marker.read_text() == "imported"
    assert json.loads(out.read_text())["scores"]["topic"]["n"] == 5


def test_pipeline_evaluation_needs_trust_task_code_in_the_recipe(test_zoo: Zoo, hostile) -> None:  # noqa: F811
    zoo_dir, marker = hostile
    base = ResolvedModel(reference="zoo:test/base", path=str(test_zoo.base), content_hash="sha256:" + "1" * 64)
    spec = EvaluationSpec(tasks=["topic"], zoo=str(zoo_dir), limit=4)
    with pytest.raises(TaskCodeError, match=r"evaluation\.trust_task_code"):
        pipeline.evaluate_stage(base, spec)
    assert not marker.exists()
    trusted = spec.model_copy(update={"trust_task_code": True})
    ev = pipeline.evaluate_stage(base, trusted)
    assert marker.exists() and set(ev.accuracy) == {"topic"} and not ev.reused
    assert pipeline.evaluate_stage(base, trusted).reused
    # trusted task code is part of what was scored: edited, it is scored again instead of served from the cache
    module = zoo_dir / "tasks" / "evil.py"
    module.write_text(module.read_text() + "# edited\n")
    assert not pipeline.evaluate_stage(base, trusted).reused
    # the opt-in is in the recipe's evaluation section, as a plain boolean
    assert EvaluationSpec.model_validate({"zoo": str(zoo_dir), "trust_task_code": True}).trust_task_code


def test_a_zoo_folder_linked_to_another_disk_is_still_mergeflows_own(tmp_path: Path, monkeypatch) -> None:
    """MERGEFLOW_HOME/zoo may be a symbolic link (zoos moved to a bigger disk): the zoos under it stay trusted."""
    home, disk = tmp_path / "home", tmp_path / "disk" / "zoos"
    disk.mkdir(parents=True)
    home.mkdir()
    (home / "zoo").symlink_to(disk, target_is_directory=True)
    monkeypatch.setenv("MERGEFLOW_HOME", str(home))
    assert (disk / "test-seed0").resolve().is_relative_to(trusted_zoo_dir())


def test_mergeflows_own_zoo_works_as_before_here_or_elsewhere(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    assert test_zoo.root.is_relative_to(trusted_zoo_dir())
    check_task_code(test_zoo, test_zoo.tasks)  # the zoo cache: trusted, read as data
    copy = Zoo.load(copy_zoo(test_zoo, tmp_path / "moved"))  # a mergeflow zoo elsewhere: its files are data only
    check_task_code(copy, copy.tasks)
    assert evaluate_path(test_zoo.base, ["complete"], zoo=copy.root, limit=5).scores["complete"].n == 5


def test_a_foreign_template_elsewhere_needs_the_opt_in(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    # no !function at all, but lm-eval renders templates with an unsandboxed Jinja environment: this one writes a file
    zoo_dir = copy_zoo(test_zoo, tmp_path / "templated")
    marker = tmp_path / "marker"
    cfg = yaml.safe_load((zoo_dir / TASK_FILE).read_text())
    opened = "cycler.__init__.__globals__['__builtins__']['open']"
    cfg["doc_to_text"] = "{{ " + opened + f"({str(marker)!r}, 'w').write('x') }}}}{{{{context}}}}"
    (zoo_dir / TASK_FILE).write_text(yaml.safe_dump(cfg))
    with pytest.raises(TaskCodeError, match="not one mergeflow writes"):
        evaluate_path(test_zoo.base, ["topic"], zoo=zoo_dir, limit=2)
    assert not marker.exists()
    assert evaluate_path(test_zoo.base, ["topic"], zoo=zoo_dir, limit=2, trust_task_code=True).scores["topic"].n == 2
    assert marker.exists()


def test_task_code_in_the_zoo_cache_still_needs_the_opt_in(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    # the zoo cache's folders are trusted as data: a task file there that imports code is refused all the same
    zoo_dir = copy_zoo(test_zoo, trusted_zoo_dir() / "planted-seed0")
    try:
        marker = tmp_path / "marker"
        plant(zoo_dir / "tasks", marker)
        edit_task(zoo_dir, process_docs="!function evil.process_docs")
        with pytest.raises(TaskCodeError, match="runs code"):
            evaluate_path(test_zoo.base, ["topic"], zoo=zoo_dir, limit=5)
        assert not marker.exists()
    finally:
        shutil.rmtree(zoo_dir)


@pytest.mark.parametrize("case", ["installed module", "module outside", "include outside", "task file linked out"])
def test_code_outside_the_zoo_folder_is_refused_even_when_trusted(test_zoo: Zoo, tmp_path: Path,  # noqa: F811
                                                                   case: str) -> None:
    zoo_dir = copy_zoo(test_zoo, tmp_path / "zoo")
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "marker"
    plant(outside, marker)
    task = zoo_dir / TASK_FILE
    if case == "installed module":  # lm-eval falls back to importing any installed module
        edit_task(zoo_dir, process_docs="!function os.system")
        match = "would import code from outside the zoo folder"
    elif case == "module outside":  # a module beside the task files that is a link to one elsewhere
        (zoo_dir / "tasks" / "up.py").symlink_to(outside / "evil.py")
        edit_task(zoo_dir, process_docs="!function up.process_docs")
        match = "would import code from outside the zoo folder"
    elif case == "include outside":
        (outside / "base.yaml").write_text("process_docs: !function evil.process_docs\n")
        edit_task(zoo_dir, include=str(outside / "base.yaml"))
        match = "resolves outside the zoo folder"
    else:
        moved = outside / "zoo_topic.yaml"
        shutil.move(task, moved)
        task.symlink_to(moved)
        match = "resolves outside its zoo folder"
    with pytest.raises(TaskCodeError, match=match):
        evaluate_path(test_zoo.base, ["topic"], zoo=zoo_dir, limit=5, trust_task_code=True)
    assert not marker.exists()


def test_an_include_inside_the_folder_is_allowed_when_trusted(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    zoo_dir = copy_zoo(test_zoo, tmp_path / "zoo")
    marker = tmp_path / "marker"
    plant(zoo_dir / "tasks", marker)
    (zoo_dir / "tasks" / "_common.yaml").write_text("process_docs: !function evil.process_docs\n")
    edit_task(zoo_dir, include="_common.yaml")
    zoo = Zoo.load(zoo_dir)
    with pytest.raises(TaskCodeError, match=r"include: _common.yaml, !function evil.process_docs"):
        check_task_code(zoo, ["topic"])
    assert evaluate_path(test_zoo.base, ["topic"], zoo=zoo, limit=3, trust_task_code=True).scores["topic"].n == 3
    assert marker.exists()


def test_a_run_with_untrusted_task_code_is_refused_when_planned(hostile) -> None:
    # refused before the merges it would evaluate run, not after them
    zoo_dir, marker = hostile
    recipe = {"merge_method": "task_arithmetic", "base_model": "zoo:test/base",
              "models": [{"model": "zoo:test/topic"}], "parameters": {"lambda": 1.0},
              "evaluation": {"tasks": ["topic"], "zoo": str(zoo_dir)}}
    with pytest.raises(TaskCodeError, match="runs code"):
        graph.plan([("hostile", recipe)])
    trusted = {**recipe, "evaluation": {**recipe["evaluation"], "trust_task_code": True}}
    assert "hostile" in graph.plan([("hostile", trusted)]).targets
    assert not marker.exists()  # planning never loads task code


def test_importance_reads_a_zoo_as_data_only(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    # importance data.zoo reads the JSONL rows (and the target delimiter with a safe loader), never through lm-eval:
    # a template that would write a file is never rendered, so no trust is asked for
    from mergeflow.importance.data import load_task_data

    zoo_dir = copy_zoo(test_zoo, tmp_path / "templated")
    marker = tmp_path / "marker"
    cfg = yaml.safe_load((zoo_dir / TASK_FILE).read_text())
    cfg["doc_to_text"] = "{{ cycler.__init__.__globals__['__builtins__']['open'](" + repr(str(marker)) + ", 'w') }}"
    (zoo_dir / TASK_FILE).write_text(yaml.safe_dump(cfg))
    data = load_task_data("topic", "fewshot", 3, zoo=zoo_dir)
    assert len(data.examples) == 3 and not marker.exists()
