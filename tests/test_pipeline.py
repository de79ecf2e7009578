"""The pipeline's stages as library functions (no Prefect): manifests, content-addressed reuse, zoo references,
grids, and the checks that refuse a bad run before heavy work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeflow import graph, pipeline
from mergeflow.checkpoints import resolve
from mergeflow.errors import CheckpointError, RecipeError, ZooError
from mergeflow.recipe import parse_recipe
from mergeflow.zoo.build import parse_zoo_reference
from tests.zoo_fixtures import test_zoo  # noqa: F401

TASKS = ("topic", "nli", "complete")


def zoo_recipe(**extra):
    data = {"merge_method": "ties", "base_model": "zoo:test/base", "name": "pipeline test",
            "models": [{"model": f"zoo:test/{t}", "parameters": {"density": 0.3}, "task": t} for t in TASKS],
            "parameters": {"lambda": 1.0},
            "evaluation": {"tasks": ["zoo", "zoo-ood"], "zoo": "zoo:test", "limit": 20,
                           "selection": {"split": "validation", "limit": 10}}}
    data.update(extra)
    return data


# ------------------------------------------------------------------------------------------------ references


def test_zoo_references_parse_and_resolve(test_zoo):  # noqa: F811
    assert parse_zoo_reference("zoo:full/base") == ("full", 0, "base")
    assert parse_zoo_reference("zoo:test@3/topic") == ("test", 3, "topic")
    assert parse_zoo_reference("zoo:test") == ("test", 0, None)
    for bad in ("zoo:", "zoo:huge/base", "zoo:test/a/b", "zoo:test@x/base"):
        with pytest.raises(ZooError):
            parse_zoo_reference(bad)
    snap = resolve("zoo:test/topic")
    assert snap.path == test_zoo.experts["topic"]
    assert snap.content_hash == resolve(test_zoo.experts["topic"]).content_hash
    with pytest.raises(CheckpointError, match="no member 'sentiment'"):
        resolve("zoo:test/sentiment")
    with pytest.raises(CheckpointError, match="names a zoo, not a model"):
        resolve("zoo:test")


def test_recipe_hash_ignores_evaluation_and_registry():
    a = parse_recipe(zoo_recipe())
    b = parse_recipe(zoo_recipe(evaluation={"tasks": ["zoo"], "limit": 5}, registry={"name": "other"}))
    c = parse_recipe(zoo_recipe(parameters={"lambda": 0.5}))
    assert a.recipe_hash() == b.recipe_hash() != c.recipe_hash()
    with pytest.raises(RecipeError, match="unknown selection metric"):
        parse_recipe(zoo_recipe(evaluation={"selection": {"metric": "f1"}}))
    with pytest.raises(RecipeError, match=r"registry\.name"):
        parse_recipe(zoo_recipe(registry={"name": "has space"}))


def test_registry_defaults():
    spec = pipeline.registry_spec(parse_recipe(zoo_recipe(name="TA on zoo")))
    assert (spec.name, spec.experiment, spec.alias) == ("TA-on-zoo", "TA-on-zoo", "champion")
    assert pipeline.registry_spec(parse_recipe(zoo_recipe()), "given").name == "given"


def test_version_description_names_method_parameters_and_score():
    """The one line a registry user reads in the versions list (the registry's description of each version)."""
    same = parse_recipe(zoo_recipe(importance=[{"estimator": "sens", "data": {"zoo": "zoo:test", "n": 8}}]))
    short = same.recipe_hash().split(":")[-1][:12]
    assert pipeline.version_description(same, "validation_in_domain_avg", 71.254, True) == (
        f"ties (lambda=1.0); each expert density=0.3; importance sens; 3 experts over zoo:test/base; "
        f"selection validation_in_domain_avg = 71.25 (higher is better); recipe {short}")
    models = [{"model": "zoo:test/topic", "task": "topic", "parameters": {"weight": [0.2, 0.4]}},
              {"model": "zoo:test/nli", "task": "nli"}]
    mixed = parse_recipe(zoo_recipe(merge_method="linear", models=models, parameters={}, base_model=None))
    assert pipeline.version_description(mixed, "validation_avg", 2.0, False).startswith(
        "linear; experts topic (weight=[0.2,0.4]), nli (defaults); 2 experts; "
        "selection validation_avg = 2.00 (lower is better); recipe ")


# ------------------------------------------------------------------------------------------------------ grid


def test_expand_grid_sets_paths_and_validates():
    points = pipeline.expand_grid(zoo_recipe(), {"parameters.lambda": [0.5, 1.0],
                                                 "models.*.parameters.density": [0.2, 0.4]})
    assert [label for label, _ in points] == ["lambda=0.5 density=0.2", "lambda=0.5 density=0.4",
                                              "lambda=1.0 density=0.2", "lambda=1.0 density=0.4"]
    _, last = points[-1]
    assert last["parameters"]["lambda"] == 1.0
    assert [m["parameters"]["density"] for m in last["models"]] == [0.4] * 3
    assert zoo_recipe()["parameters"]["lambda"] == 1.0  # the input is not modified
    assert len({parse_recipe(p).recipe_hash() for _, p in points}) == 4
    with pytest.raises(RecipeError, match=r"grid\.parameters\.lambda: expected a non-empty list"):
        pipeline.expand_grid(zoo_recipe(), {"parameters.lambda": 0.5})
    with pytest.raises(RecipeError, match="not an index"):
        pipeline.expand_grid(zoo_recipe(), {"models.7.parameters.density": [0.1]})
    with pytest.raises(RecipeError, match="grid point merge_method=nope"):
        pipeline.expand_grid(zoo_recipe(), {"merge_method": ["nope"]})


# ---------------------------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def resolved(test_zoo):  # noqa: F811
    recipe = parse_recipe(zoo_recipe())
    base_ref, expert_refs = pipeline.references(recipe)
    return recipe, pipeline.resolve_stage(base_ref), [pipeline.resolve_stage(r) for r in expert_refs]


def test_resolve_manifest(resolved, test_zoo):  # noqa: F811
    _, base, experts = resolved
    assert base.path == str(test_zoo.base)
    assert base.content_hash == resolve(test_zoo.base).content_hash
    assert [e.reference for e in experts] == [f"zoo:test/{t}" for t in TASKS]
    assert type(base).model_validate_json(base.model_dump_json()) == base  # manifests are plain JSON


def test_task_vectors_thresholds_match_the_merge(resolved):
    recipe, base, experts = resolved
    densities = pipeline.trim_densities(recipe, base, 0)
    assert densities == [0.3]
    tv = pipeline.task_vectors_stage(base, experts[0], densities)
    # the exact global threshold: keep the top 30% of |Δ| over the whole task vector
    from safetensors.torch import load_file

    b, e = load_file(Path(base.path) / "model.safetensors"), load_file(Path(experts[0].path) / "model.safetensors")
    deltas = torch.cat([(e[n].float() - b[n].float()).abs().flatten() for n in b if b[n].is_floating_point()])
    threshold = tv.thresholds["0.3"]
    assert bool((deltas == threshold).any())  # an exact order statistic, not an estimate
    assert (deltas >= threshold).float().mean().item() == pytest.approx(0.3, abs=1 / deltas.numel() + 1e-6)
    assert tv.l2_norm == pytest.approx(float(torch.linalg.vector_norm(deltas)), rel=1e-5)
    linear = parse_recipe(zoo_recipe(merge_method="task_arithmetic", models=[
        {"model": f"zoo:test/{t}"} for t in TASKS]))
    assert pipeline.trim_densities(linear, base, 0) == []


def test_merge_stage_is_content_addressed_and_checked(resolved):
    recipe, base, experts = resolved
    first = pipeline.merge_stage(recipe, base, experts)
    again = pipeline.merge_stage(recipe, base, experts)
    assert not first.reused and again.reused
    assert first.path == again.path and first.content_hash == again.content_hash
    assert json.loads((Path(first.path) / "mergeflow.json").read_text())["recipe_hash"] == recipe.recipe_hash()
    other = pipeline.merge_stage(parse_recipe(zoo_recipe(parameters={"lambda": 0.5})), base, experts)
    assert other.content_hash != first.content_hash
    # a data-aware recipe without its coefficients is refused, not merged without them
    aware = parse_recipe(zoo_recipe(importance=[{"estimator": "cocktail", "data": {"zoo": "zoo:test"}}]))
    with pytest.raises(RecipeError, match="1 entries but the merge was given 0"):
        pipeline.merge_stage(aware, base, experts)
    # a checkpoint that changed after resolve is caught before its result is published
    stale = base.model_copy(update={"content_hash": "sha256:" + "0" * 64})
    with pytest.raises(RecipeError, match="changed between the resolve and merge stages"):
        pipeline.merge_stage(parse_recipe(zoo_recipe(parameters={"lambda": 0.7})), stale, experts)


def test_evaluate_stage_matches_lm_eval_directly(resolved, test_zoo):  # noqa: F811
    from mergeflow.evaluation import evaluate_path

    recipe, base, _ = resolved
    # a limit no other test uses: the first call computes (other modules may have scored the base already)
    spec = pipeline.evaluation_spec(recipe).model_copy(update={"limit": 23})
    ev = pipeline.evaluate_stage(base, spec)
    direct = evaluate_path(base.path, ["zoo", "zoo-ood"], zoo=test_zoo, limit=23)
    assert ev.accuracy == {t: s.acc for t, s in direct.scores.items()}
    assert ev.in_domain == list(test_zoo.in_domain) and ev.ood == list(test_zoo.ood)
    assert ev.in_domain_avg == pytest.approx(sum(ev.accuracy[t] for t in test_zoo.in_domain) / 3, abs=1e-3)
    assert not ev.reused and pipeline.evaluate_stage(base, spec).reused
    sel = pipeline.evaluate_stage(base, spec, split="validation", limit=10)
    assert sel.split == "validation" and sel.limit == 10
    assert pipeline.selection_value(sel, "acc:nli") == sel.accuracy["nli"]
    with pytest.raises(RecipeError, match="not evaluated"):
        pipeline.selection_value(sel, "acc:arith")


def test_run_pipeline_data_aware_end_to_end(test_zoo):  # noqa: F811
    recipe = zoo_recipe(merge_method="task_arithmetic", models=[{"model": f"zoo:test/{t}", "task": t} for t in TASKS],
                        parameters={}, importance=[{"estimator": "cocktail", "data": {"zoo": "zoo:test"}}])
    out = graph.run_pipeline(recipe, register=False, device="auto")
    assert [c.estimator for c in out["coefficients"]] == ["cocktail"]
    weights = out["coefficients"][0].fields["weight"]
    assert weights["min"] >= 0 and weights["max"] <= 1
    assert out["evaluation"].split == "test" and out["selection"].split == "validation"
    provenance = json.loads((Path(out["merged"].path) / "mergeflow.json").read_text())
    assert [c["estimator"] for c in provenance["coefficients"]] == ["cocktail"]
    assert [i["reference"] for i in provenance["inputs"]] == ["zoo:test/base", *(f"zoo:test/{t}" for t in TASKS)]


def test_importance_shards_measured_apart_then_finalized_without_a_pass(resolved, monkeypatch):
    """The flows' fan-out in library terms: each per-expert shard measured by its own call (as workers would), then
    the entry's stage finalizes from the cached shards; an estimator without by-expert parts has no shards."""
    _, base, experts = resolved
    # data no other test draws (seed 7): every shard is measured here
    spec = {"estimator": "regmean", "parameters": {"batch_size": 4}, "data": {"zoo": "zoo:test", "n": 6, "seed": 7}}
    job = pipeline.ImportanceJob(spec, list(TASKS), base, experts)
    shards = job.shards()
    assert [(s["part"], s["experts"]) for s in shards] == [("all", [0]), ("all", [1]), ("all", [2])]
    for s in reversed(shards):
        m = job.measure(s["part"], s["experts"])
        assert m.key == s["key"] and not m.reused and m.passes["forward"] > 0
        assert list(m.experts_references) == [experts[s["experts"][0]].reference]
    from mergeflow.importance.base import Measurements

    def no_pass(*args, **kwargs):
        raise AssertionError("the importance stage measured again what its shards had measured")

    monkeypatch.setattr(Measurements, "save", no_pass)  # every measurement, whatever the estimator, is saved
    out = job.coefficients()
    assert out.estimator == "regmean" and out.passes["forward"] == sum(
        job.measure("all", s["experts"]).passes["forward"]
        for s in shards)
    assert pipeline.ImportanceJob({"estimator": "cocktail", "data": {"zoo": "zoo:test"}}, list(TASKS), base,
                                  experts).shards() == []
    with pytest.raises(RecipeError, match="no measurement job"):
        job.measure("all", [0, 1])


def test_zoo_builds_of_one_folder_wait_for_each_other(tmp_path, monkeypatch):
    """Pipeline tasks resolve zoo:... references side by side: only one may build a zoo folder at a time."""
    import threading
    import time

    from mergeflow.zoo import build

    active, most, calls = [0], [0], []
    guard = threading.Lock()

    def fake_build(target, spec, size, seed, **kwargs):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.1)
        calls.append(target)
        with guard:
            active[0] -= 1

    monkeypatch.setattr(build, "_build_zoo", fake_build)
    threads = [threading.Thread(target=build.build_zoo, args=(tmp_path / "zoo",), kwargs={"size": "test"})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 4 and most[0] == 1
