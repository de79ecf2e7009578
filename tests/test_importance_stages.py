"""Two-stage estimators: measurements cached under their own key, finalize knobs re-run without a model pass.

For each converted estimator: a run, then runs that change only finalize parameters with every model load and the
measure stage refused (so a pass would fail the test); their artifacts must equal a from-scratch computation with
the new parameters (``use_cache=False``: fresh measurements) bit for bit, and report the measurements' passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeflow.cache import Cache
from mergeflow.checkpoints import resolve
from mergeflow.coefficients import CoefficientField, Coefficients
from mergeflow.errors import RecipeError
from mergeflow.importance import base as importance_base
from mergeflow.importance.base import (
    MEASUREMENTS_KIND,
    Estimator,
    ImportanceRun,
    LazyEntries,
    Measurements,
    MeasurePart,
    ModelRef,
    compute_coefficients,
    get_estimator,
)
from mergeflow.importance.data import load_task_data
from mergeflow.methods.base import ParamSpec
from tests.tiny_models import write_jsonl

ROWS = [
    [("the quick brown fox", "jumps over the lazy dog"), ("the lazy dog", "jumps over"), ("over the lazy", "dog")],
    [("nine plus three", "mod ten equals two"), ("three plus nine mod ten", "equals two")],
    [("alice went to the kitchen", "and cooked the soup"), ("alice cooked", "the soup"), ("the soup", "alice")],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(families, tmp_path_factory):
    base, experts = families("llama")
    folder = tmp_path_factory.mktemp("stages_tasks")
    tasks = [load_task_data(str(write_jsonl(folder / f"t{i}.jsonl", rows)), n=len(rows)) for i, rows in enumerate(ROWS)]
    return _ref(base), [_ref(e) for e in experts], tasks


def _ref(path) -> ModelRef:
    return ModelRef(str(path), path, resolve(str(path)).content_hash)


def _compute(name, setup, cache: Path | None, *, with_base=True, **params) -> Coefficients:
    base, experts, tasks = setup
    return compute_coefficients(name, base=base if with_base else None, experts=experts, tasks=tasks, params=params,
                                cache=Cache(cache) if cache else None, use_cache=cache is not None, threads=1)


@contextlib.contextmanager
def _no_model_pass(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[None]:
    """Within: loading a model, or measuring anything for estimator ``name``, fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model pass ran where the measurements should have been reused")

    with monkeypatch.context() as m:
        m.setattr(ImportanceRun, "load_model", refuse)
        m.setitem(importance_base.ESTIMATORS, name, dataclasses.replace(get_estimator(name), measure=refuse))
        yield


def _assert_equal(a: torch.Tensor, b: torch.Tensor, what: object) -> None:
    """Bit for bit (NaN where the other has NaN: SLTA's condition of an unsolved module)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_same(a: Coefficients, b: Coefficients) -> None:
    assert a.params == b.params
    assert a.fields.keys() == b.fields.keys()
    for name, fa in a.fields.items():
        fb = b.fields[name]
        assert (fa.level, fa.partitions, fa.default, fa.gqa_policy) == (fb.level, fb.partitions, fb.default,
                                                                        fb.gqa_policy), name
        if fa.level == "entry":
            assert a.path is not None and b.path is not None
            for i in range(len(a.experts)):
                ta = load_file(str(a.path / "entry" / name / f"{i}.safetensors"))
                tb = load_file(str(b.path / "entry" / name / f"{i}.safetensors"))
                assert ta.keys() == tb.keys() and ta
                for n in ta:
                    _assert_equal(ta[n], tb[n], (name, i, n))
        else:
            _assert_equal(fa.values, fb.values, name)
    assert a.scores.keys() == b.scores.keys() and a.score_partitions == b.score_partitions
    for name in a.scores:
        _assert_equal(a.scores[name], b.scores[name], name)


def _check_variants(monkeypatch, name, setup, cache, first_params, variants, *, with_base=True) -> Coefficients:
    """First run measures; each variant (finalize parameters only) reuses the measurements and equals from scratch."""
    first = _compute(name, setup, cache, with_base=with_base, **first_params)
    assert first.stats["measurements"]["reused"] is False
    parts = first.stats["measurements"]["parts"]
    for part in parts.values():
        assert part["keys"] and all(Cache(cache).get(MEASUREMENTS_KIND, k) is not None for k in part["keys"])
    for change in variants:
        params = {**first_params, **change}
        with _no_model_pass(monkeypatch, name):
            again = _compute(name, setup, cache, with_base=with_base, **params)
        record = again.stats["measurements"]
        assert record["reused"] is True, change
        assert record["parts"] and all(r["keys"] == parts[p]["keys"] for p, r in record["parts"].items())
        # what the measurements it uses cost, for the cost report
        used = {kind: sum(parts[p]["passes"][kind] for p in record["parts"]) for kind in ("forward", "backward")}
        assert again.stats["passes"] == used
        scratch = _compute(name, setup, None, with_base=with_base, **params)
        assert scratch.stats["measurements"]["reused"] is False
        assert scratch.stats["passes"] == used
        _assert_same(again, scratch)
        _assert_same_except(again, first, change)
    return first


def _assert_same_except(a: Coefficients, b: Coefficients, change: dict) -> None:
    """The changed knob changes the result: the variants are not no-ops."""
    assert _differ(a, b), f"changing {change} changed nothing"


def _differ(a: Coefficients, b: Coefficients) -> bool:
    if a.scores.keys() != b.scores.keys() or any(
            not torch.equal(a.scores[n].nan_to_num(), b.scores[n].nan_to_num()) for n in a.scores):
        return True
    if a.fields.keys() != b.fields.keys():
        return True
    for name, fa in a.fields.items():
        fb = b.fields[name]
        if (fa.partitions, fa.default) != (fb.partitions, fb.default):
            return True
        if fa.level == "entry":
            assert a.path is not None and b.path is not None
            ta = load_file(str(a.path / "entry" / name / "0.safetensors"))
            tb = load_file(str(b.path / "entry" / name / "0.safetensors"))
            if any(not torch.equal(ta[n], tb[n]) for n in ta):
                return True
        elif not torch.equal(fa.values, fb.values):
            return True
    return False


# ------------------------------------------------------------------------------------------ converted estimators


def test_sens_finalize_knobs_and_ablation_parts(setup, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    first = _check_variants(monkeypatch, "sens", setup, cache, {"batch_size": 3}, [
        {"temperature": 0.2},
        {"temperature_mode": "relative"},
        {"cross_task": "inverse"},
        {"lambda": 0.5},
        {"nonblock": "uniform"},
        {"ablation": "task_specific"},
        {"ablation": "cross_task"},
    ])
    assert set(first.stats["measurements"]["parts"]) == {"sensitivity", "distance"}
    # a fresh cache: the cross-task ablation measures the distances only, then "both" reuses them and measures
    # only the sensitivities
    other = tmp_path / "other"
    cross = _compute("sens", setup, other, batch_size=3, ablation="cross_task")
    assert set(cross.stats["measurements"]["parts"]) == {"distance"} and cross.stats["passes"]["backward"] == 0
    both = _compute("sens", setup, other, batch_size=3)
    parts = both.stats["measurements"]["parts"]
    assert parts["distance"]["reused"] and not parts["sensitivity"]["reused"]
    assert not both.stats["measurements"]["reused"]
    assert both.stats["passes"] == first.stats["passes"]
    _assert_same(both, first)
    # a measure parameter is a new measurement (of the part that depends on it only)
    frob = _compute("sens", setup, other, batch_size=3, logit_reduction="frobenius")
    parts = frob.stats["measurements"]["parts"]
    assert parts["sensitivity"]["reused"] and not parts["distance"]["reused"]


def test_apl_calibration_and_mi_knobs_reuse_the_scores(setup, monkeypatch, tmp_path):
    """The drop-ratio calibration and the MI-TA weights only read the scores: p, ε, T, the mapping and T_m make no
    model pass (the quality benchmark's grids over p and T_m trace once)."""
    first = _check_variants(monkeypatch, "apl", setup, tmp_path / "cache", {"level": "layer", "weights": "mi"}, [
        {"p": 0.5},
        {"epsilon": 0.1, "temperature": 1.0},
        {"mapping": "linear"},
        {"model_temperature": 0.2},
        {"weights": "none"},  # causal tracing measures the model score whatever the weights
    ])
    record = first.stats["measurements"]["parts"]["all"]
    assert [s["experts"] for s in record["shards"]] == [[0], [1], [2]]  # expert by expert, each on its own task
    # the shards of one run read the base once (it is kept for the later shards), each expert once
    import mergeflow.transformers_io as tio

    loads: list[str] = []
    real = tio.load_causal_lm
    monkeypatch.setattr(tio, "load_causal_lm", lambda path, **kw: loads.append(str(path)) or real(path, **kw))
    _compute("apl", setup, None, level="layer", estimator="grad")
    base, experts, _ = setup
    assert sorted(loads) == sorted([str(base.path)] + [str(e.path) for e in experts])
    # grad scores: another measurement; out of domain every expert reads the target: one shard (one base pass)
    grad = _compute("apl", setup, tmp_path / "cache", level="layer", estimator="grad")
    assert not grad.stats["measurements"]["reused"]
    base, experts, tasks = setup
    ood = compute_coefficients("apl", base=base, experts=experts, tasks=[tasks[0]] * 3, params={"level": "layer"},
                               ood=True, cache=Cache(tmp_path / "cache"), threads=1)
    assert "shards" not in ood.stats["measurements"]["parts"]["all"]


def test_cocktail_temperature_and_base_membership(setup, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    # without the base first: only the experts' losses are measured; with it, only the base's loss is added
    alone = _compute("cocktail", setup, cache, include_base=False)
    assert set(alone.stats["measurements"]["parts"]) == {"experts"}
    assert alone.stats["passes"]["forward"] == 3 * 4  # 3 experts × 4 mini-batches of 2 (8 examples)
    first = _check_variants(monkeypatch, "cocktail", setup, tmp_path / "cache2", {}, [
        {"temperature": 0.5},
        {"include_base": False},
        {"include_base": False, "temperature": 1.0},
    ])
    assert first.stats["passes"]["forward"] == 4 * 4
    with_base = _compute("cocktail", setup, cache)
    parts = with_base.stats["measurements"]["parts"]
    assert parts["experts"]["reused"] and not parts["base"]["reused"]
    _assert_same(with_base, first)


def test_fisher_scales_reuse_the_diagonals(setup, monkeypatch, tmp_path):
    first = _check_variants(monkeypatch, "fisher", setup, tmp_path / "cache", {"fisher": "empirical", "batch_size": 2},
                            [{"normalize": True}, {"minimal_fisher_weight": 1e-3}], with_base=False)
    # measured expert by expert: expert 1's diagonal is the only entry of the second shard
    record = first.stats["measurements"]["parts"]["all"]
    assert [s["experts"] for s in record["shards"]] == [[0], [1], [2]]
    measured = Cache(tmp_path / "cache").get(MEASUREMENTS_KIND, record["keys"][1])
    assert measured is not None
    # the written weight is (F + ε)/K: the raw diagonal is in the measurements
    raw = load_file(str(measured / "entries" / "fisher" / "0.safetensors"))
    weight = load_file(str(first.path / "entry" / "weight" / "1.safetensors"))
    assert raw.keys() == weight.keys()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(weight[name], (raw[name] + 1e-6).mul_(1 / 3))


def test_regmean_alpha_reuses_the_grams(setup, monkeypatch, tmp_path):
    first = _check_variants(monkeypatch, "regmean", setup, tmp_path / "cache", {"batch_size": 2},
                            [{"alpha": 0.5}, {"alpha": 1.0}], with_base=False)
    assert first.stats["tied_layers"] == [] and "lm_head.weight" in first.stats["layers"]


def test_uncached_artifact_folder_lives_as_long_as_the_artifact(setup):
    """Without a cache an artifact is built in a scratch folder (its entry fields are read from it lazily while
    merging); the folder goes when the artifact does, so library calls and sweeps do not fill the temp folder."""
    art = _compute("fisher", setup, None, with_base=False, fisher="empirical", batch_size=2)
    folder = art.path
    assert folder is not None and (folder / "entry" / "weight" / "0.safetensors").is_file()
    del art
    gc.collect()
    assert not folder.exists()


def test_regmean_conv1d_marker_survives_the_two_stages(families, tmp_path, monkeypatch):
    base, experts = families("gpt2")
    tasks = [load_task_data(str(write_jsonl(tmp_path / f"t{i}.jsonl", rows)), n=2) for i, rows in enumerate(ROWS)]
    gpt2 = (_ref(base), [_ref(e) for e in experts], tasks)
    art = _check_variants(monkeypatch, "regmean", gpt2, tmp_path / "cache", {}, [{"alpha": 0.3}], with_base=False)
    assert art.stats["tied_layers"] == ["lm_head"]
    grams = load_file(str(art.path / "entry" / "gram" / "0.safetensors"))
    g = grams["transformer.h.0.mlp.c_fc.weight"]
    assert g.dim() == 3 and g.shape[0] == 1  # [1, in, in]: the weight is stored [in, out]


def test_slta_solve_knobs_reuse_the_module_grams(setup, monkeypatch, tmp_path):
    first = _check_variants(monkeypatch, "slta", setup, tmp_path / "cache", {"level": "layer", "batch_size": 2}, [
        {"balanced": False},
        {"clip_alpha_high": 0.3, "clip_alpha_low": -0.1},
        {"nonmodule": "task_arithmetic", "nonmodule_lambda": 0.7},
    ])
    assert first.stats["passes"]["forward"] == 2 + 1 + 2  # one base forward per batch of 2 (3, 2, 3 examples)
    # cond_max: every system above it is solved by least squares (the same α on these well-posed systems)
    with _no_model_pass(monkeypatch, "slta"):
        lstsq = _compute("slta", setup, tmp_path / "cache", level="layer", batch_size=2, cond_max=1.0)
    assert lstsq.stats["measurements"]["reused"] and set(lstsq.stats["solver"]) == {"lstsq"}
    _assert_same(lstsq, _compute("slta", setup, None, level="layer", batch_size=2, cond_max=1.0))
    torch.testing.assert_close(lstsq.fields["weight"].values, first.fields["weight"].values, rtol=1e-6, atol=1e-9)


def test_slta_clip_order_is_refused_before_measuring(setup, monkeypatch, tmp_path):
    with _no_model_pass(monkeypatch, "slta"), pytest.raises(RecipeError, match="clip_alpha_low"):
        _compute("slta", setup, tmp_path / "cache", clip_alpha_low=1.0, clip_alpha_high=0.0)


# ------------------------------------------------------------------------------------------------ the protocol


PARAMS = (ParamSpec("scale", float, 1.0), ParamSpec("size", int, 2), ParamSpec("extra", bool, False))


def _toy(calls: list[tuple[str, dict]], *, parts: tuple[MeasurePart, ...] = ()) -> Estimator:
    """Measures ``arange(size)`` per part (and an entry tensor per expert); finalize multiplies by ``scale``."""

    def measure(run: ImportanceRun) -> Measurements:
        calls.append((run.part, dict(run.params)))
        run.count(forward=run.params["size"])
        for i in range(run.k):
            run.write_entry(f"big.{run.part}", i, {"w": torch.full((3,), float(i))})
        return Measurements({f"v.{run.part}": torch.arange(run.params["size"], dtype=torch.float64)},
                            stats={f"n.{run.part}": run.params["size"]})

    def finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
        total = sum(float(t.sum()) for t in measured.tensors.values())
        values = torch.full((run.k, 1), total * run.params["scale"], dtype=torch.float64)
        return run.coefficients({"weight": CoefficientField("model", ["model"], values)},
                                stats={"measured": sorted(measured.stats)})

    return Estimator(name="toy", params=PARAMS, summary="toy", paper="none", measure=measure, finalize=finalize,
                     measure_params=("size", "extra"), measure_parts=parts, needs_base=False)


@pytest.fixture
def toy_inputs(tmp_path):
    task = load_task_data(str(write_jsonl(tmp_path / "t.jsonl", ROWS[0])), n=3)
    experts = [ModelRef(f"e{i}", tmp_path / f"e{i}", f"{i:064x}") for i in range(2)]
    return experts, [task, task]


def _toy_run(monkeypatch, est, toy_inputs, cache, **params) -> Coefficients:
    monkeypatch.setitem(importance_base.ESTIMATORS, "toy", est)
    experts, tasks = toy_inputs
    return compute_coefficients("toy", base=None, experts=experts, tasks=tasks, params=params,
                                cache=Cache(cache) if cache else None, use_cache=cache is not None, threads=1)


def test_measure_sees_only_its_parameters_and_runs_once(monkeypatch, toy_inputs, tmp_path):
    calls: list = []
    est = _toy(calls)
    a = _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=2.0)
    assert calls == [("all", {"size": 2, "extra": False})]  # no finalize parameter reaches measure
    assert float(a.fields["weight"].values[0, 0]) == 2.0 and a.stats["passes"]["forward"] == 2
    b = _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=3.0)
    assert len(calls) == 1 and float(b.fields["weight"].values[0, 0]) == 3.0
    assert b.stats["measurements"]["reused"] and b.stats["passes"] == {"forward": 2, "backward": 0}
    c = _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=3.0, size=3)  # a measure parameter: measured again
    assert len(calls) == 2 and float(c.fields["weight"].values[0, 0]) == 9.0 and not c.stats["measurements"]["reused"]
    _toy_run(monkeypatch, est, toy_inputs, None, scale=3.0)  # without a cache: measured in a scratch folder
    assert len(calls) == 3
    folders = sorted(p.name for p in (tmp_path / MEASUREMENTS_KIND).iterdir())
    assert len(folders) == 2
    m = Measurements.load(tmp_path / MEASUREMENTS_KIND / b.stats["measurements"]["parts"]["all"]["keys"][0])
    assert m.passes == {"forward": 2, "backward": 0} and m.stats == {"n.all": 2}
    assert [dict(m.entry("big.all", i))["w"].tolist() for i in range(2)] == [[0.0] * 3, [1.0] * 3]


def test_parts_are_measured_when_needed_and_cached_apart(monkeypatch, toy_inputs, tmp_path):
    calls: list = []
    parts = (MeasurePart("one", ("size",)), MeasurePart("two", ("size", "extra"), lambda p: p["scale"] > 1))
    est = _toy(calls, parts=parts)
    a = _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=1.0)
    assert calls == [("one", {"size": 2})] and a.stats["measured"] == ["n.one"]
    b = _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=2.0)
    assert calls[1:] == [("two", {"size": 2, "extra": False})]
    assert {p: r["reused"] for p, r in b.stats["measurements"]["parts"].items()} == {"one": True, "two": False}
    assert b.stats["passes"]["forward"] == 4 and float(b.fields["weight"].values[0, 0]) == 4.0
    _toy_run(monkeypatch, est, toy_inputs, tmp_path, scale=2.0, extra=True)  # only part two depends on extra
    assert calls[2:] == [("two", {"size": 2, "extra": True})]


def _by_expert_toy(calls: list) -> Estimator:
    """Rows, entries and stats that name the expert they were measured for, to check where stacking puts them."""

    def measure(run: ImportanceRun) -> Measurements:
        ids = [int(e.content_hash, 16) for e in run.experts]
        calls.append(ids)
        run.count(forward=len(ids))
        for i, who in enumerate(ids):
            run.write_entry("big", i, {"w": torch.full((2,), float(who))})
        return Measurements({"row": torch.tensor(ids, dtype=torch.float64)[:, None].repeat(1, 2)},
                            stats={"who": [e.reference for e in run.experts], "n": len(ids), "size": run.params["size"]})

    def finalize(run: ImportanceRun, measured: Measurements) -> Coefficients:
        entries = [float(dict(measured.entry("big", i))["w"][0]) for i in range(run.k)]
        return run.coefficients({"weight": CoefficientField("model", ["model"], measured.tensors["row"][:, :1])},
                                stats={"who": measured.stats["who"], "n": measured.stats["n"], "entries": entries})

    part = MeasurePart(importance_base.WHOLE, ("size",), by_expert=True, expert_stats=("who",), summed_stats=("n",))
    return Estimator(name="toy", params=PARAMS, summary="toy", paper="none", measure=measure, finalize=finalize,
                     measure_params=("size", "extra"), measure_parts=(part,), needs_base=False)


def test_by_expert_parts_are_measured_in_shards_and_stacked_in_expert_order(monkeypatch, tmp_path):
    """Experts sharing their task data form one shard (one pass over the data serves them); each shard is cached
    on its own, can be measured ahead by another worker (measure_shard), and comes back in the experts' order."""
    calls: list = []
    monkeypatch.setitem(importance_base.ESTIMATORS, "toy", _by_expert_toy(calls))
    a = load_task_data(str(write_jsonl(tmp_path / "a.jsonl", ROWS[0])), n=3)
    b = load_task_data(str(write_jsonl(tmp_path / "b.jsonl", ROWS[1])), n=2)
    experts = [ModelRef(f"e{i}", tmp_path / f"e{i}", f"{i + 1:064x}") for i in range(3)]
    tasks = [a, b, a]
    assert importance_base.expert_shards(tasks) == [(0, 2), (1,)]
    cache = Cache(tmp_path / "cache")
    # a worker measures the second shard first; the run then measures only the first one
    pre = importance_base.measure_shard("toy", base=None, experts=experts, tasks=tasks, part="all", shard=[1],
                                        cache=cache, threads=1)
    assert pre["experts"] == [1] and not pre["reused"] and calls == [[2]]
    out = compute_coefficients("toy", base=None, experts=experts, tasks=tasks, cache=cache, threads=1)
    assert calls == [[2], [1, 3]]
    record = out.stats["measurements"]["parts"]["all"]
    assert [s["experts"] for s in record["shards"]] == [[0, 2], [1]]
    assert [s["reused"] for s in record["shards"]] == [False, True] and not record["reused"]
    assert record["keys"][1] == pre["key"]
    assert out.fields["weight"].values[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert out.stats["entries"] == [1.0, 2.0, 3.0]
    assert out.stats["who"] == ["e0", "e1", "e2"] and out.stats["n"] == 3 and out.stats["passes"]["forward"] == 3
    # the same numbers without a cache (one scratch folder per shard), and a run over fewer experts reuses shards
    scratch = compute_coefficients("toy", base=None, experts=experts, tasks=tasks, use_cache=False, threads=1)
    assert torch.equal(scratch.fields["weight"].values, out.fields["weight"].values)
    calls.clear()
    again = compute_coefficients("toy", base=None, experts=experts[1:2], tasks=tasks[1:2], cache=cache, threads=1)
    assert calls == [] and again.stats["measurements"]["reused"] and again.fields["weight"].values.tolist() == [[2.0]]
    assert importance_base.measure_shard("toy", base=None, experts=experts, tasks=tasks, part="all", shard=[0, 2],
                                         cache=cache, threads=1)["reused"]
    with pytest.raises(RecipeError, match="no measurement job"):
        importance_base.measure_shard("toy", base=None, experts=experts, tasks=tasks, part="all", shard=[0],
                                      cache=cache)


def test_stacking_refuses_shards_that_do_not_fit():
    part = MeasurePart("p", (), by_expert=True)
    one = Measurements({"x": torch.zeros(1)}, stats={"c": 1})
    with pytest.raises(ValueError, match="once each"):
        Measurements.stack([((0,), one), ((0,), one)], part)
    with pytest.raises(ValueError, match="differs between shards"):
        Measurements.stack([((0,), one), ((1,), Measurements({"x": torch.zeros(1)}, stats={"c": 2}))], part)
    with pytest.raises(ValueError, match="2 rows for 3 experts"):
        Measurements.stack([((0, 2), one), ((1,), one)], part)


def test_estimator_declarations_are_checked():
    def f(*args):
        return None

    with pytest.raises(ValueError, match="give compute, or measure and finalize"):
        Estimator(name="x", params=PARAMS, summary="", paper="")
    with pytest.raises(ValueError, match="give compute, or measure and finalize"):
        Estimator(name="x", params=PARAMS, summary="", paper="", compute=f, measure=f, finalize=f)
    with pytest.raises(ValueError, match="not a parameter"):
        Estimator(name="x", params=PARAMS, summary="", paper="", measure=f, finalize=f, measure_params=("nope",))
    with pytest.raises(ValueError, match="not in measure_params"):
        Estimator(name="x", params=PARAMS, summary="", paper="", measure=f, finalize=f, measure_params=("size",),
                  measure_parts=(MeasurePart("p", ("scale",)),))
    for name in ("apl", "sens", "cocktail", "fisher", "regmean", "slta"):
        assert get_estimator(name).two_stage, name
    with pytest.raises(ValueError, match="both hold"):
        Measurements.combine([Measurements({"a": torch.zeros(1)}), Measurements({"a": torch.ones(1)})])
    lazy = LazyEntries(2, lambda i: {"w": torch.tensor([float(i)])})
    assert len(lazy) == 2 and [float(d["w"]) for d in lazy] == [0.0, 1.0]
    with pytest.raises(IndexError):
        lazy[2]
