"""Issue 15, cases 1, 2, 3 and 7: what a merge reads and writes stays where the recipe says, and nothing non-finite
is written.

1. files copied beside the merged weights (configs, tokenizer) never follow a symlink out of their checkpoint; weight
   shards linked outside it are refused under ``confine_paths``;
2. ``confine_paths`` compares real paths (``~`` expanded, symlinks resolved, relative to the recipe's folder, never
   the working directory);
3. recipe parameters are finite (and within float32's range), and a merged tensor holding NaN/Inf is refused before
   the output is renamed into place;
7. a model's ``task`` file is read against the recipe's folder by ``mergeflow merge`` and is confined too.

Every refusal is checked as the user sees it: exit code 2, one ``error:`` line, no output and no leftovers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergeflow.checkpoints import contained_file, resolve
from mergeflow.engine import MergeOptions, merge
from mergeflow.errors import NonFiniteResultError, RecipeError, UnsafePathError
from mergeflow.recipe import load_recipe, parse_recipe
from tests.cli_helpers import cli as _cli
from tests.cli_helpers import keep_sigterm  # noqa: F401  (an autouse fixture)
from tests.cli_helpers import refused as _refused
from tests.tiny_models import write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = MergeOptions(progress=False)
ROWS = [
    ("the quick brown fox", "jumps over the lazy dog"),
    ("alice went to the kitchen and", "cooked the soup"),
    ("nine plus three mod ten", "equals two"),
    ("merging fine tuned language", "models with task vectors"),
]




def _no_output(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _workspace(families, tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A recipe folder holding copies of the tiny Llama base and two experts."""
    base, experts = families("llama")
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copytree(base, folder / "base")
    for i, e in enumerate(experts[:2]):
        shutil.copytree(e, folder / f"expert{i}")
    return folder, folder / "base", [folder / "expert0", folder / "expert1"]


def _recipe(folder: Path, body: str = "", *, confine: bool = False, name: str = "r.yaml",
            base: str = "./base", models: tuple[str, ...] = ("./expert0", "./expert1")) -> Path:
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\n"
            + ("confine_paths: true\n" if confine else "")
            + "models:\n" + "".join(f"  - model: {m}\n" for m in models) + body)
    path = folder / name
    path.write_text(text)
    return path


def _outside_copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    return dest


# ------------------------------------------------------------------------------ 1. side files and weight shards


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
@pytest.mark.parametrize("confine", [False, True])
def test_side_file_linked_outside_the_checkpoint_is_refused(families, tmp_path: Path, name: str,
                                                            confine: bool) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    # a valid file of the same kind, outside the checkpoint (a copy, so only the link itself can be the problem)
    secret = _outside_copy(base / name, tmp_path / "elsewhere" / name)
    (base / name).unlink()
    (base / name).symlink_to(secret)
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=confine)), str(out), "--no-progress")
    _refused(result, f"{base / name}", "outside the checkpoint folder")
    _no_output(out)


def test_side_file_linked_inside_the_checkpoint_is_copied_as_a_plain_file(families, tmp_path: Path) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    (base / "files").mkdir()
    (base / "tokenizer.json").rename(base / "files" / "tokenizer.json")
    (base / "tokenizer.json").symlink_to(Path("files") / "tokenizer.json")
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=True)), str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (base / "files" / "tokenizer.json").read_bytes()


def test_weight_shard_linked_outside_is_refused_under_confine_paths(families, tmp_path: Path) -> None:
    folder, _, experts = _workspace(families, tmp_path)
    shard = experts[1] / "model.safetensors"
    outside = _outside_copy(shard, tmp_path / "elsewhere" / "model.safetensors")
    shard.unlink()
    shard.symlink_to(outside)
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=True)), str(out), "--no-progress")
    _refused(result, f"weight file {shard}", "outside the checkpoint folder")
    _no_output(out)
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        resolve(experts[1], confine=True)
    # without confine_paths a shard kept on other storage is the user's choice (its bytes are hashed as usual)
    assert resolve(experts[1]).content_hash == resolve(families("llama")[1][1]).content_hash


def test_hub_snapshot_links_into_its_blobs_are_inside_the_checkpoint(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "b1").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "b1"))
    assert contained_file(snapshot, "tokenizer.json") == (repo / "blobs" / "b1").resolve()
    assert contained_file(snapshot, "missing.json") is None
    (tmp_path / "secret").write_text("x")
    (snapshot / "special_tokens_map.json").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        contained_file(snapshot, "special_tokens_map.json")


def test_hub_snapshot_base_merges_under_confine_paths(families, tmp_path: Path, monkeypatch) -> None:
    from tests.test_checkpoints import populate_hub_cache

    folder, base, _ = _workspace(families, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    snapshot = populate_hub_cache(tmp_path / "hf_cache", "org/tiny", base)
    out = tmp_path / "out"
    merge(load_recipe(_recipe(folder, base="org/tiny", confine=True)), out, options=QUIET)
    assert (snapshot / "tokenizer.json").is_symlink() and not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------- 2. confine_paths escapes


def test_confine_paths_expands_home_before_comparing(families, tmp_path: Path, monkeypatch) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(base, tmp_path / "elsewhere" / "base")
    monkeypatch.setenv("HOME", str(home))
    recipe = _recipe(folder, confine=True, base="~/../elsewhere/base")
    with pytest.raises(RecipeError, match=r"base_model: model '~/\.\./elsewhere/base' lies outside the recipe folder"):
        load_recipe(recipe)
    out = tmp_path / "out"
    _refused(_cli("merge", str(recipe), str(out), "--no-progress"), "base_model:", "outside the recipe folder")
    _no_output(out)


def test_relative_model_path_is_never_read_from_the_working_directory(families, tmp_path: Path,
                                                                      monkeypatch) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    cwd = tmp_path / "cwd"
    shutil.copytree(base, cwd / "models" / "base")  # exists only under the working directory
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    for confine in (True, False):
        recipe = _recipe(folder, confine=confine, base="models/base", name=f"r{confine}.yaml")
        _refused(_cli("merge", str(recipe), str(out), "--no-progress"), "'models/base'")
        _no_output(out)


def test_confine_paths_resolves_symlinked_model_folders(families, tmp_path: Path) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    shutil.move(base, tmp_path / "elsewhere")
    (folder / "base").symlink_to(tmp_path / "elsewhere")
    recipe = _recipe(folder, confine=True)
    with pytest.raises(RecipeError, match=r"base_model: model '\./base' lies outside the recipe folder"):
        load_recipe(recipe)
    out = tmp_path / "out"
    _refused(_cli("merge", str(recipe), str(out), "--no-progress"), "outside the recipe folder")
    _no_output(out)


def test_confine_paths_covers_coefficients_task_files_and_zoo_folders(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "recipes"
    (folder / "inside").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (folder / "link").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {"merge_method": "linear", "confine_paths": True,
            "models": [{"model": "org/a", "task": "./inside/a.jsonl"}, {"model": "org/b", "task": "./inside/b.jsonl"}],
            "importance": {"estimator": "fisher"}}

    def refused(change: dict, where: str) -> None:
        with pytest.raises(RecipeError, match=rf"{where}: .*lies outside the recipe folder") as info:
            parse_recipe({**data, **change}, recipe_dir=folder)
        assert "\n" not in str(info.value)

    parse_recipe(data, recipe_dir=folder)  # everything inside: accepted
    refused({"coefficients": ["../outside"]}, r"coefficients\[0\]")
    refused({"coefficients": ["./link"]}, r"coefficients\[0\]")
    refused({"models": [{"model": "org/a", "task": "../a.jsonl"}, data["models"][1]]}, r"models\[0\]\.task")
    refused({"models": [data["models"][0], {"model": "org/b", "task": "./link/b.jsonl"}]}, r"models\[1\]\.task")
    refused({"importance": {"estimator": "fisher", "data": {"zoo": "~/zoo"}}}, r"importance\[0\]\.data\.zoo")
    refused({"base_model": "org/base", "importance": {"estimator": "cocktail", "data": {"target": "/t.jsonl"}}},
            r"importance\[0\]\.data\.target")
    refused({"evaluation": {"zoo": "../zoo"}}, r"evaluation\.zoo")
    # zoo references by scheme and task names are not paths
    parse_recipe({**data, "evaluation": {"zoo": "zoo:test"},
                  "models": [{"model": "org/a", "task": "arith"}, {"model": "org/b", "task": "lmeval_copy"}]},
                 recipe_dir=folder)
    # without a recipe folder there is nothing to confine a local path to
    with pytest.raises(RecipeError, match="no folder to confine it to"):
        parse_recipe({**data, "coefficients": ["/c"]})


# ------------------------------------------------------------------------------------------ 3. non-finite values


@pytest.mark.parametrize(("setting", "where"), [
    ("  - model: ./expert0\n    parameters: {weight: .inf}\n", r"models\[0\]\.parameters\.weight: inf"),
    ("  - model: ./expert0\n    parameters: {weight: 1e300}\n", r"models\[0\]\.parameters\.weight: 1e\+300"),
    ("  - model: ./expert0\n    parameters: {weight: [1.0, -.inf]}\n", r"models\[0\]\.parameters\.weight: -inf"),
    ("  - model: ./expert0\nparameters: {lambda: 1.0e39}\n", r"parameters\.lambda: 1e\+39"),
])
def test_non_finite_parameters_are_refused_when_the_recipe_loads(tmp_path: Path, setting: str, where: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n" + setting)
    with pytest.raises(RecipeError, match=rf"{where} is not a finite number within float32 range") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    _refused(_cli("merge", str(path), str(out)), "not a finite number")
    _no_output(out)


def test_non_finite_estimator_parameters_are_refused() -> None:
    with pytest.raises(RecipeError, match=r"importance\[0\]\.parameters\.minimal_fisher_weight: inf is not a finite"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "org/a", "task": "a.jsonl"},
                                                           {"model": "org/b", "task": "b.jsonl"}],
                      "importance": {"estimator": "fisher", "parameters": {"minimal_fisher_weight": float("inf")}}})


def test_merged_tensor_overflow_is_refused_and_the_previous_output_kept(families, tmp_path: Path) -> None:
    folder, _, _ = _workspace(families, tmp_path)
    out = tmp_path / "out"
    merge(load_recipe(_recipe(folder)), out, options=QUIET)
    before = _snapshot(out)
    # finite weights whose sum overflows float16: the merged tensors are Inf
    bad = _recipe(folder, "parameters: {weight: 1.0e6, normalize: false}\nout_dtype: float16\n", name="bad.yaml")
    bad.write_text(bad.read_text().replace("task_arithmetic", "linear").replace("base_model: ./base\n", ""))
    with pytest.raises(NonFiniteResultError, match=r"the merged tensor '[\w.]+' has \d+ non-finite values"):
        merge(load_recipe(bad), out, options=MergeOptions(progress=False, overwrite=True))
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    fresh = tmp_path / "fresh"
    _refused(_cli("merge", str(bad), str(fresh), "--no-progress"), "non-finite values", "nothing was written")
    _no_output(fresh)


# ------------------------------------------------------------------------------------------ 7. task files


def _task_recipe(folder: Path, tasks: tuple[str, str], *, confine: bool = False) -> Path:
    path = folder / "aware.yaml"
    path.write_text("merge_method: linear\n" + ("confine_paths: true\n" if confine else "") + "models:\n"
                    + "".join(f"  - model: ./expert{i}\n    task: {t}\n" for i, t in enumerate(tasks))
                    + "importance:\n  estimator: fisher\n  parameters: {fisher: empirical, batch_size: 2}\n"
                    + "  data: {n: 3}\n")
    return path


def test_task_files_are_read_against_the_recipe_folder(families, tmp_path: Path, monkeypatch) -> None:
    folder, _, _ = _workspace(families, tmp_path)
    for i in range(2):  # rows no other test uses: the coefficients are cached by content, and a hit would carry the
        # stats (the file names below) of the run that computed them
        write_jsonl(folder / f"t{i}.jsonl", [(f"{c} in the recipe folder", a) for c, a in (ROWS[i:] + ROWS[:i])[:3]])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for i in range(2):  # same names in the working directory, unreadable as task data
        (cwd / f"t{i}.jsonl").write_text("not json\n")
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    result = _cli("merge", str(_task_recipe(folder, ("./t0.jsonl", "t1.jsonl"))), str(out), "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    provenance = json.loads((out / "mergeflow.json").read_text())
    assert provenance["coefficients"][0]["estimator"] == "fisher"
    read = json.dumps(provenance["coefficients"][0]["stats"])
    assert str((folder / "t0.jsonl").resolve()) in read and str((folder / "t1.jsonl").resolve()) in read


def test_task_files_outside_the_recipe_folder_are_refused_under_confine_paths(families, tmp_path: Path) -> None:
    folder, _, _ = _workspace(families, tmp_path)
    write_jsonl(tmp_path / "t.jsonl", ROWS[:3])
    write_jsonl(folder / "t.jsonl", ROWS[:3])
    out = tmp_path / "out"
    result = _cli("merge", str(_task_recipe(folder, ("./t.jsonl", "../t.jsonl"), confine=True)), str(out),
                  "--no-progress")
    _refused(result, "models[1].task: task file '../t.jsonl' lies outside the recipe folder")
    _no_output(out)


def test_confined_resolves_are_distinct_nodes_and_unconfined_keys_unchanged() -> None:
    from mergeflow import graph

    free, confined = graph.ResolveNode(reference="./m"), graph.ResolveNode(reference="./m", confine_paths=True)
    assert free.key != confined.key
    assert "confine_paths" not in free.parameters() and confined.parameters()["confine_paths"] is True
