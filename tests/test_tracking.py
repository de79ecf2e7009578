"""MLflow layer against a real SQLite-backed MLflow store: runs, params, tags, artifacts, the logged MLflow Model
(transformers flavor) and what the standard loaders make of it, dataset inputs, registry, aliases.

One store per module (MLflow's first touch of a new database runs its migrations, about 5 s); each test registers
under its own model name so the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import LoggedModelStatus  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: E402

from mergeflow import __version__  # noqa: E402
from mergeflow.checkpoints import resolve  # noqa: E402
from mergeflow.errors import TrackingError  # noqa: E402
from mergeflow.tracking import (  # noqa: E402
    ENV_PROJECT_DIR,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    TAG_FLOW_RUN_ID,
    TAG_INPUT_HASHES,
    TAG_MODEL_HASH,
    TAG_RECIPE_HASH,
    TAG_VERSION,
    EvaluationData,
    Registration,
    champion,
    configure,
    flatten_params,
    log_merge,
    promote,
    tracking_uri,
)
from tests.tiny_models import make_expert, make_model  # noqa: E402

RECIPE = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [{"model": "org/math", "parameters": {"weight": 1.0}}, {"model": "./code", "parameters": {}}],
    "parameters": {"lambda": 0.5, "density": [0.2, 0.4]},
    "importance": [{"method": "apl", "parameters": {"p": 2}}],
    "odd key:é/": "kept",  # ':' is dropped from keys, the rest is allowed by MLflow
}
INPUTS = {"org/base": "sha256:" + "a" * 64, "/abs/experts/math": "sha256:" + "b" * 64}
RECIPE_HASH = "sha256:" + "c" * 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A fresh SQLite store (+ its mlartifacts/) and an isolated mergeflow home for this module."""
    root = tmp_path_factory.mktemp("mlflow").resolve()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)  # recorded so the value MLflow exports is undone too
        mp.delenv(ENV_PROJECT_DIR, raising=False)
        mp.setenv("MERGEFLOW_HOME", str(root / "home"))
        configure()
        yield root
        mlflow.set_tracking_uri(None)  # MLflow keeps the URI in a global too; leave nothing behind
        mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five different tiny Llama folders standing in for merged models (config, safetensors, tokenizer, card)."""
    root = tmp_path_factory.mktemp("merged")
    base = make_model("llama", root / "m0", seed=0)
    folders = [base] + [make_expert(base, root / f"m{i}", seed=100 + i) for i in range(1, 5)]
    for i, folder in enumerate(folders):
        (folder / "README.md").write_text(f"# merged model {i}\n")
        (folder / "mergeflow.json").write_text(json.dumps({"recipe_hash": RECIPE_HASH}) + "\n")
    return folders


def _log(model: Path, name: str, value: float | None = None, experiment: str = "merges", **kwargs) -> Registration:
    return log_merge(model, recipe=RECIPE, recipe_hash=RECIPE_HASH, input_hashes=INPUTS, experiment=experiment,
                     registered_name=name, metrics={"val/avg_acc": value or 0.0},
                     selection_metric=None if value is None else ("val/avg_acc", value), **kwargs)


def _versions(name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


@pytest.fixture(scope="module")
def first(store: Path, models: list[Path], tmp_path_factory: pytest.TempPathFactory):
    extra = tmp_path_factory.mktemp("extra")
    (extra / "coefficients").mkdir()
    (extra / "coefficients" / "coefficients.json").write_text("{}\n")
    (extra / "heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (extra / "accuracy.csv").write_text("task,acc\narith,0.5\n")
    rows = [{"context": f"{i} plus 1 is", "choices": [str(i + 1), str(i)], "label": 0} for i in range(5)]
    (extra / "arith-validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    registration = log_merge(
        models[0], recipe=RECIPE, recipe_hash=RECIPE_HASH, input_hashes=INPUTS, experiment="merges",
        registered_name="tiny-first", metrics={"val/avg_acc": 0.5, "arith/acc": 0.25, "seconds": 1.5},
        selection_metric=("val/avg_acc", 0.5), tags={"team": "merging"}, flow_run_id="flow-run-123",
        artifacts={"coefficients": extra / "coefficients", "plots": extra / "heatmap.png",
                   "tables": extra / "accuracy.csv"},
        description="ties (lambda=0.5); selection val/avg_acc = 0.50",
        datasets=[EvaluationData("arith/validation[:3]", extra / "arith-validation.jsonl", limit=3,
                                 metrics=("arith/acc",))])
    return registration


def test_flatten_params() -> None:
    flat = flatten_params({**RECIPE, "long": "x" * (MAX_PARAM_VAL_LENGTH + 10), "a": {"b": 1}, "a.b": 2,
                           "empty": [], "/abs": "v", "..": "dots"})
    assert flat["models.0.model"] == "org/math"
    assert flat["models.0.parameters.weight"] == "1.0"
    assert flat["models.1.parameters"] == "{}"
    assert flat["parameters.lambda"] == "0.5"
    assert flat["parameters.density.1"] == "0.4"
    assert flat["importance.0.parameters.p"] == "2"
    assert flat["odd key_é_"] == "kept"  # a trailing "/" is not a normalised path: "/" becomes "_"
    assert flat["empty"] == "[]"
    assert flat["a.b"] == "1" and flat["a.b_2"] == "2"  # a collision keeps both values
    assert flat["_abs"] == "v" and flat["_.."] == "dots"  # MLflow refuses non-normalised path keys
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH and flat["long"].endswith("...")


def test_log_merge_records_run_and_registers_champion(store: Path, first, models: list[Path]) -> None:
    client = MlflowClient()
    assert (first.name, first.version, first.reused) == ("tiny-first", "1", False)
    assert first.champion and first.previous_champion is None
    assert first.model_uri == first.to_dict()["model_uri"] == "models:/tiny-first/1"
    assert first.model_hash == resolve(models[0], scan_finite=False).content_hash

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(RECIPE)
    assert run.data.params["parameters.lambda"] == "0.5"
    tags = run.data.tags
    assert tags[TAG_RECIPE_HASH] == RECIPE_HASH
    assert tags[TAG_MODEL_HASH] == first.model_hash
    assert tags[TAG_VERSION] == __version__
    assert json.loads(tags[TAG_INPUT_HASHES]) == INPUTS
    assert tags["mergeflow.input.org/base"] == INPUTS["org/base"]
    assert tags["mergeflow.input./abs/experts/math"] == INPUTS["/abs/experts/math"]
    assert tags[TAG_FLOW_RUN_ID] == "flow-run-123"
    assert tags["team"] == "merging"
    assert run.data.metrics == {"val/avg_acc": 0.5, "arith/acc": 0.25, "seconds": 1.5}

    assert run.data.tags["mlflow.note.content"].startswith("Registration of one merge")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # MLflow 3's model view, not the GenAI one

    # the evaluation data: one dataset input (the 3 rows scored), its metric linked to it
    [data] = run.inputs.dataset_inputs
    assert data.dataset.name == "arith/validation[:3]" and json.loads(data.dataset.profile)["num_rows"] == 3
    assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "evaluation"}

    # the run's own files; the model is an MLflow 3 logged model, the run's output
    assert {a.path for a in client.list_artifacts(first.run_id)} == {"coefficients", "plots", "tables"}
    assert [a.path for a in client.list_artifacts(first.run_id, "plots")] == ["plots/heatmap.png"]
    assert [a.path for a in client.list_artifacts(first.run_id, "coefficients")] == ["coefficients/coefficients.json"]
    assert [o.model_id for o in run.outputs.model_outputs] == [first.model_id]
    logged = client.get_logged_model(first.model_id)
    assert (logged.source_run_id, logged.experiment_id) == (first.run_id, experiment.experiment_id)
    assert logged.status == LoggedModelStatus.READY
    assert logged.params["parameters.lambda"] == "0.5" and logged.tags[TAG_MODEL_HASH] == first.model_hash
    assert {m.key: m.value for m in logged.metrics} == {"val/avg_acc": 0.5, "arith/acc": 0.25, "seconds": 1.5}
    on_data = {m.key: (m.dataset_name, m.dataset_digest) for m in logged.metrics}
    assert on_data["arith/acc"] == (data.dataset.name, data.dataset.digest) and on_data["seconds"] == (None, None)
    # artifacts live beside the SQLite database, not in ./mlruns
    assert logged.artifact_location.startswith((store / "mlartifacts").as_uri() + "/")
    folder = Path(logged.artifact_location.removeprefix("file://"))
    mlmodel = (folder / "MLmodel").read_text()
    assert "transformers:" in mlmodel and "python_function:" in mlmodel and "task: text-generation" in mlmodel
    assert {p.name for p in (folder / "model").iterdir()} == {p.name for p in models[0].iterdir()}  # the folder as is
    assert (folder / "model" / "model.safetensors").read_bytes() == (models[0] / "model.safetensors").read_bytes()
    assert [p.name for p in folder.rglob("*.safetensors")] == ["model.safetensors"]  # the weights once

    version = client.get_model_version("tiny-first", "1")
    assert version.source == first.source == f"models:/{first.model_id}"
    assert version.description == "ties (lambda=0.5); selection val/avg_acc = 0.50"
    assert version.run_id == first.run_id and version.status == "READY"
    assert version.tags[TAG_MODEL_HASH] == first.model_hash
    assert json.loads(client.get_logged_model(first.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "tiny-first", "version": "1"}]
    assert str(client.get_model_version_by_alias("tiny-first", "champion").version) == "1"
    held = champion("tiny-first")
    assert held is not None
    assert (held.version, held.metric, held.value, held.higher_is_better) == ("1", "val/avg_acc", 0.5, True)
    assert held.model_hash == first.model_hash and held.run_id == first.run_id
    assert champion("tiny-first", alias="nobody") is None and champion("no-such-model") is None


def test_champion_loads_back_with_identical_logits(store: Path, first, models: list[Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = resolve("models:/tiny-first@champion")
    assert snapshot.revision == first.version
    assert snapshot.content_hash == first.model_hash
    assert store / "home" in snapshot.path.parents  # downloaded into the mergeflow cache
    ids = torch.tensor([[1, 5, 17, 42, 3, 88, 2]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(models[0]).eval()(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(snapshot.path).eval()(ids).logits
    assert torch.equal(original, loaded)
    text = "the quick brown fox"
    assert (AutoTokenizer.from_pretrained(snapshot.path)(text).input_ids
            == AutoTokenizer.from_pretrained(models[0])(text).input_ids)


def test_champion_loads_with_pyfunc_and_generates(store: Path, first, models: list[Path]) -> None:
    """What a registry user does: the standard pyfunc loader on models:/NAME@champion, then generate; the text is
    what transformers' own pipeline makes of the original folder (greedy, same settings)."""
    from transformers import pipeline

    prompt = "the quick brown fox"
    loaded = mlflow.pyfunc.load_model("models:/tiny-first@champion")
    assert loaded.metadata.model_id == first.model_id
    assert loaded.metadata.metadata[TAG_MODEL_HASH] == first.model_hash
    [text] = loaded.predict([prompt], params={"max_new_tokens": 6})
    expected = pipeline("text-generation", model=str(models[0]))(prompt, max_new_tokens=6, do_sample=False,
                                                                  return_full_text=False)[0]["generated_text"]
    assert text == expected and text.strip()


def test_plain_folder_versions_still_resolve_and_are_hash_checked(store: Path, models: list[Path]) -> None:
    """Versions registered before the MLflow Model layout (the folder as run artifacts) keep resolving; a version
    whose weights do not hash to its mergeflow.model_hash tag is refused."""
    from mergeflow.errors import CheckpointError

    client = MlflowClient()
    experiment = client.get_experiment_by_name("merges").experiment_id
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(models[3]), artifact_path="model")
    client.create_registered_model("tiny-plain")
    good_hash = resolve(models[3], scan_finite=False).content_hash
    for tag in (good_hash, "sha256:" + "0" * 64):
        client.create_model_version("tiny-plain", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                    tags={TAG_MODEL_HASH: tag})
    snapshot = resolve("models:/tiny-plain/1")
    assert snapshot.content_hash == good_hash and (snapshot.path / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="not to the version"):
        resolve("models:/tiny-plain/2")


def test_alias_moves_only_to_a_strictly_better_version(store: Path, models: list[Path]) -> None:
    name = "tiny-promo"
    a = _log(models[0], name, 0.5)
    assert (a.version, a.champion, a.previous_champion) == ("1", True, None)
    worse = _log(models[1], name, 0.4)
    assert (worse.version, worse.champion, worse.previous_champion) == ("2", False, "1")
    tie = _log(models[2], name, 0.5)
    assert (tie.version, tie.champion, tie.previous_champion) == ("3", False, "1")
    assert champion(name).version == "1"
    better = _log(models[3], name, 0.6)
    assert (better.version, better.champion, better.previous_champion) == ("4", True, "1")
    assert champion(name).version == "4" and champion(name).value == 0.6
    assert MlflowClient().get_model_version(name, "2").tags["mergeflow.selection.val/avg_acc"] == "0.4"

    # another alias with its own rule (lower is better), promoted by hand
    loss = {"alias": "lowest_loss", "higher_is_better": False}
    assert promote(name, "2", "val_loss", 2.0, **loss) == (True, None)
    assert promote(name, "3", "val_loss", 3.0, **loss) == (False, "2")
    assert promote(name, "3", "val_loss", 2.0, **loss) == (False, "2")
    assert promote(name, "1", "val_loss", 1.0, **loss) == (True, "2")
    assert champion(name, "lowest_loss").version == "1" and champion(name).version == "4"

    # a rule that does not match the alias's is refused before anything is logged
    with pytest.raises(TrackingError, match="lower is better"):
        promote(name, "2", "val_loss", 0.1, alias="lowest_loss", higher_is_better=True)
    with pytest.raises(TrackingError, match="'val/avg_acc'"):
        _log(models[4], name, 0.9, higher_is_better=False)
    with pytest.raises(TrackingError, match="selection metric"):
        _log(models[4], name, float("nan"))
    assert _versions(name) == ["1", "2", "3", "4"]


def test_same_weights_reuse_the_version(store: Path, models: list[Path]) -> None:
    name = "tiny-idem"
    # a first attempt that registered but never promoted (as if it crashed before promotion)
    first = _log(models[1], name, None, experiment="idem")
    assert (first.version, first.champion, first.reused) == ("1", False, False)
    again = _log(models[1], name, 0.7, experiment="idem")
    assert (again.version, again.run_id, again.reused) == ("1", first.run_id, True)
    assert (again.champion, again.previous_champion) == (True, None)  # the promotion the crash missed
    third = _log(models[1], name, 0.7, experiment="idem")
    assert (third.version, third.reused, third.champion, third.previous_champion) == ("1", True, True, "1")
    assert _versions(name) == ["1"]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("idem").experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]

    # promote=False (a sweep promotes its best merge later): the value is recorded, the alias stays
    later = _log(models[2], name, 0.9, experiment="idem", promote=False)
    assert (later.version, later.champion, later.previous_champion, later.reused) == ("2", False, "1", False)
    assert client.get_model_version(name, "2").tags["mergeflow.selection.val/avg_acc"] == "0.9"
    assert promote(name, later.version, "val/avg_acc", 0.9) == (True, "1")
    assert _versions(name) == ["1", "2"]


def test_partial_folder_is_refused(store: Path, models: list[Path], tmp_path: Path) -> None:
    client = MlflowClient()
    truncated = shutil.copytree(models[4], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_config = shutil.copytree(models[4], tmp_path / "no_config")
    (no_config / "config.json").unlink()
    stray = shutil.copytree(models[4], tmp_path / "stray")
    (stray / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00")
    no_tokenizer = shutil.copytree(models[4], tmp_path / "no_tokenizer")
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    for folder, message in [(truncated, "truncated"), (no_config, "no config.json"), (stray, "model-00002"),
                            (no_tokenizer, "no tokenizer")]:
        with pytest.raises(TrackingError, match=message):
            log_merge(folder, recipe=RECIPE, recipe_hash=RECIPE_HASH, input_hashes=INPUTS, experiment="partial",
                      registered_name="tiny-partial", metrics={}, selection_metric=("val/avg_acc", 0.9))
    assert client.get_experiment_by_name("partial") is None  # refused before any run or experiment
    assert client.search_model_versions("name = 'tiny-partial'") == []
    assert client.search_registered_models("name = 'tiny-partial'") == []
    with pytest.raises(TrackingError, match="reserved"):
        _log(models[4], "tiny-partial", 0.5, artifacts={"model": models[4] / "README.md"})
    with pytest.raises(TrackingError, match="does not exist"):
        _log(models[4], "tiny-partial", 0.5, artifacts={"plots": tmp_path / "missing.png"})
    with pytest.raises(TrackingError, match="not a number"):
        log_merge(models[4], recipe=RECIPE, recipe_hash=RECIPE_HASH, input_hashes=INPUTS, experiment="partial",
                  registered_name="tiny-partial", metrics={"acc": "high"})
    with pytest.raises(TrackingError, match="is not a file"):
        _log(models[4], "tiny-partial", 0.5, datasets=[EvaluationData("arith/test", tmp_path / "missing.jsonl")])
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(TrackingError, match="not logged: arith/acc"):
        _log(models[4], "tiny-partial", 0.5,
             datasets=[EvaluationData("arith/test", tmp_path / "rows.jsonl", metrics=("arith/acc",))])
    assert client.search_model_versions("name = 'tiny-partial'") == []


def test_default_store_is_sqlite_in_the_project_folder(store: Path, models: list[Path],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # the cwd without MERGEFLOW_PROJECT_DIR
    # the module's store is a project folder too: reuse it (a new database costs ~5 s of migrations)
    monkeypatch.setenv(ENV_PROJECT_DIR, str(store))
    assert tracking_uri() == f"sqlite:///{store}/mlflow.db"
    registration = log_merge(models[2], recipe=RECIPE, recipe_hash=RECIPE_HASH, input_hashes=INPUTS,
                             experiment="default-store", registered_name="tiny-default", metrics={},
                             selection_metric=None)
    assert mlflow.get_tracking_uri() == f"sqlite:///{store}/mlflow.db"
    experiment = MlflowClient().get_experiment_by_name("default-store")
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    assert registration.source == f"models:/{registration.model_id}"
    # <location>/models/<model id>/artifacts: the MLflow Model, its weights in the flavor's model/ folder
    logged = store / "mlartifacts" / "models" / registration.model_id / "artifacts"
    assert (logged / "MLmodel").is_file() and (logged / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "mlruns").exists() and not (store / "mlruns").exists()
    assert not registration.champion  # no selection metric: no alias
