"""Quality benchmark: data-aware merging (APL, Sens-Merging, SLTA, LM-Cocktail, Fisher, RegMean) against the data-free
baselines on the offline zoo, in the shape of APL's Table 1, plus the papers' ablations and the estimators' costs.

    python benchmarks/quality.py [--zoo DIR] [--seeds 3] [--json OUT] [--limit N] [--skip-ablations] [--skip-costs]

Protocol (the same for every method, data-free or data-aware):
  * every method has a grid of at most ``BUDGET`` configurations; the configuration is chosen on the *validation*
    split (in-domain average accuracy, seed 0) — the test split is never used to choose anything;
  * the chosen configuration is evaluated on the *test* split with ``--seeds`` seeds; the seed draws the estimators'
    data (few-shot / calibration examples) and the DARE masks; the table reports mean ± std of the in-domain average;
  * estimators read only the zoo's few-shot / calibration splits, never validation or test.
Every merge and evaluation is cached by content (MERGEFLOW_HOME), so a re-run recomputes only what changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mergeflow.cache import cache_key  # noqa: E402
from mergeflow.checkpoints import resolve  # noqa: E402
from mergeflow.engine import compute_threads, merge_state_dict, plan_merge  # noqa: E402
from mergeflow.errors import MergeflowError  # noqa: E402
from mergeflow.evaluation import evaluate  # noqa: E402
from mergeflow.importance import ModelRef, compute_coefficients, load_task_data  # noqa: E402
from mergeflow.importance.scoring import encode, lm_loss  # noqa: E402
from mergeflow.recipe import parse_recipe  # noqa: E402
from mergeflow.zoo.build import Zoo, build_zoo  # noqa: E402
from mergeflow.zoo.matrix import Matrix, MergeSpec, experts_row  # noqa: E402

BUDGET = 4  # configurations per method, baselines and data-aware alike


@dataclass
class Method:
    label: str
    data_aware: bool
    grid: list[Any]  # MergeSpec candidates, at most BUDGET
    family: str = ""

    def __post_init__(self) -> None:
        assert 1 <= len(self.grid) <= BUDGET, f"{self.label}: {len(self.grid)} configurations exceed the budget"


def _spec(label: str, method: str, parameters: Mapping[str, Any], per_model: Mapping[str, Any] | None = None,
          importance: Sequence[Mapping[str, Any]] = ()) -> Any:
    return MergeSpec(label, method, dict(parameters), dict(per_model) if per_model else None,
                     tuple(dict(i) for i in importance))


def _apl(level: str, estimator: str, weights: str, **params: Any) -> dict[str, Any]:
    return {"estimator": "apl", "parameters": {"level": level, "estimator": estimator, "weights": weights, **params}}


def _sens(**params: Any) -> dict[str, Any]:
    return {"estimator": "sens", "parameters": params}


def method_table() -> list[Method]:
    """Rows of the table and each one's search grid (≤ BUDGET configurations)."""
    s = _spec
    out = [
        Method("weight_average", False, [s("weight_average", "linear", {})]),
        Method("task_arithmetic", False, [s(f"ta λ={lam}", "task_arithmetic", {"lambda": lam})
                                          for lam in (0.3, 0.5, 0.7, 1.0)]),
        Method("ties", False, [s(f"ties k={k} λ={lam}", "ties", {"lambda": lam}, {"density": k})
                               for k in (0.2, 0.5) for lam in (0.5, 1.0)]),
        Method("dare", False, [s(f"dare p={1 - d:.1f} λ={lam}", "dare_linear", {"lambda": lam}, {"density": d})
                               for d in (0.5, 0.1) for lam in (0.5, 1.0)]),
        Method("della", False, [s(f"della d={d} λ={lam}", "della", {"lambda": lam}, {"density": d, "epsilon": 0.15})
                                for d in (0.5, 0.7) for lam in (0.5, 1.0)]),
        # the other data-free methods mergeflow ships: the best data-free baseline is the best of all of them
        Method("magnitude_prune", False, [s(f"magnitude k={k} λ={lam}", "magnitude_prune", {"lambda": lam},
                                            {"density": k}) for k in (0.2, 0.5) for lam in (0.5, 1.0)]),
        Method("breadcrumbs", False, [s(f"breadcrumbs k={k} λ={lam}", "breadcrumbs", {"lambda": lam},
                                        {"density": k, "gamma": 0.01}) for k in (0.8, 0.9) for lam in (0.5, 1.0)]),
        Method("consensus (TALL)", False, [s(f"consensus λ={lam} tall={tl}", "consensus", {"lambda": lam, "k": 2},
                                             {"tall_lambda": tl}) for lam in (0.5, 1.0) for tl in (0.4, 0.8)]),
        Method("model_stock", False, [s("model_stock", "model_stock", {})]),
        # the per-layer spectral methods (issue 12): TSV-Merge and Iso-C/Iso-CTS sweep their scaling as the papers do
        # (TSV's orthogonalised update sums the tasks' top subspaces, so λ is on task arithmetic's scale; Iso's
        # flattened spectrum has the summed update's mean singular value, tuned around 1); WUDI is the paper's
        # coefficient-free solve (no λ), so its one configuration is the paper's (300 Adam steps, lr 1e-5)
        Method("tsv", False, [s(f"tsv λ={lam}", "tsv", {"lambda": lam}) for lam in (0.3, 0.5, 0.7, 1.0)]),
        Method("iso_c", False, [s(f"iso_c λ={lam}", "iso_c", {"lambda": lam}) for lam in (0.5, 1.0, 1.5, 2.0)]),
        Method("iso_cts", False, [s(f"iso_cts λ={lam}", "iso_cts", {"lambda": lam, "common_space_fraction": 0.8})
                                  for lam in (0.5, 1.0, 1.5, 2.0)]),
        Method("wudi", False, [s("wudi", "wudi", {})]),
        Method("lm_cocktail", True, [s(f"cocktail T={t}", "task_arithmetic", {},
                                       importance=[{"estimator": "cocktail", "parameters": {"temperature": t}}])
                                     for t in (0.5, 1.0, 5.0, 10.0)]),
        Method("fisher", True, [s(f"fisher {kind} norm={norm}", "linear", {},
                                  importance=[{"estimator": "fisher",
                                               "parameters": {"fisher": kind, "normalize": norm}}])
                                for kind in ("sampled", "empirical") for norm in (False, True)]),
        Method("regmean", True, [s(f"regmean α={a}", "regmean", {},
                                   importance=[{"estimator": "regmean", "parameters": {"alpha": a}}])
                                 for a in (0.5, 0.7, 0.9, 1.0)]),
        # APL on task arithmetic: DARE with importance-calibrated drop ratios, λ as TA's
        Method("ta+apl (layer, causal)", True, [
            s(f"ta+apl p={p} λ={lam}", "dare_linear", {"lambda": lam},
              importance=[_apl("layer", "causal", "none", p=p)]) for p in (0.5, 0.9) for lam in (0.5, 1.0)]),
    ]
    # MI-TA: model-importance softmax weights on plain, DARE-pruned and APL-pruned deltas
    out.append(Method("mi-ta", True, [
        s(f"mi-ta T_m={tm}", "dare_linear", {"lambda": 1.0},
          importance=[_apl("model", "causal", "mi", p=0.0, model_temperature=tm)]) for tm in (0.05, 0.2, 1.0, 5.0)]))
    for level in ("layer", "hidden_state"):
        for est in ("causal", "grad"):
            out.append(Method(f"mi-ta+apl ({level}, {est})", True, [
                s(f"mi-ta+apl {level} {est} p={p} T_m={tm}", "dare_linear", {"lambda": 1.0},
                  importance=[_apl(level, est, "mi", p=p, model_temperature=tm)])
                for p in (0.5, 0.9) for tm in (0.2, 5.0)]))
    temps = (0.01, 0.05, 0.2, 1.0)
    out += [
        Method("ta+sens", True, [s(f"ta+sens T={t}", "task_arithmetic", {},
                                   importance=[_sens(temperature=t, **{"lambda": 0.5})]) for t in temps]),
        Method("ta+sens (task-specific only)", True, [
            s(f"ta+sens ts T={t}", "task_arithmetic", {},
              importance=[_sens(temperature=t, ablation="task_specific", **{"lambda": 0.5})]) for t in temps]),
        Method("ta+sens (cross-task only)", True, [
            s(f"ta+sens ct T={t}", "task_arithmetic", {},
              importance=[_sens(temperature=t, ablation="cross_task", **{"lambda": 0.5})]) for t in temps]),
        Method("ties+sens", True, [s(f"ties+sens T={t}", "ties", {}, {"density": 0.3},
                                     importance=[_sens(temperature=t)]) for t in temps]),
        Method("dare+sens", True, [s(f"dare+sens T={t}", "dare_linear", {}, {"density": 0.5},
                                     importance=[_sens(temperature=t, **{"lambda": 0.5})]) for t in temps]),
    ]
    for level in ("model", "layer", "attn_mlp", "head_mlp"):
        out.append(Method(f"slta ({level})", True, [
            s(f"slta {level}", "task_arithmetic", {},
              importance=[{"estimator": "slta", "parameters": {"level": level}}])]))
    # AdaMerging (not one of the three papers: the learned-coefficient baseline FusionBench ships): layer-wise as in
    # the paper and per tensor, on the labelled calibration examples; then the paper's own entropy objective
    out.append(Method("adamerging", True, [
        s(f"adamerging {level} steps={steps}", "task_arithmetic", {},
          importance=[{"estimator": "adamerging", "parameters": {"level": level, "steps": steps}}])
        for level in ("layer", "matrix") for steps in (100, 200)]))
    out.append(Method("adamerging (entropy objective)", True, [
        s(f"adamerging entropy {level}", "task_arithmetic", {},
          importance=[{"estimator": "adamerging", "parameters": {"level": level, "objective": "entropy"}}])
        for level in ("layer", "matrix")]))
    return out


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class Runner:
    zoo: Any
    limit: int | None
    seeds: int
    log: Callable[[str], None] = print
    _matrices: dict[str, Any] = field(default_factory=dict)

    def matrix(self, split: str) -> Any:
        if split not in self._matrices:
            self._matrices[split] = Matrix(self.zoo, split=split, limit=self.limit)
        return self._matrices[split]

    def in_domain_avg(self, scores: Mapping[str, float]) -> float:
        return statistics.fmean(scores[t] for t in self.zoo.in_domain)

    def select(self, method: Method) -> tuple[Any, float, dict[str, float]]:
        """The grid point with the best validation in-domain average (seed 0)."""
        best = None
        tried = {}
        for spec in method.grid:
            start = time.perf_counter()
            scores = self.matrix("validation").merge(spec, seed=0)
            avg = self.in_domain_avg(scores)
            tried[spec.label] = round(avg, 2)
            self.log(f"  [{method.label}] {spec.label}: validation {avg:.1f} ({time.perf_counter() - start:.0f} s)")
            if best is None or avg > best[1]:
                best = (spec, avg)
        assert best is not None
        return best[0], best[1], tried

    def test(self, spec: Any) -> list[dict[str, float]]:
        return [self.matrix("test").merge(spec, seed=seed) for seed in range(self.seeds)]


def summarize(runner: Runner, method: Method, spec: Any, val: float, tried: Mapping[str, float],
              runs: list[dict[str, float]]) -> dict[str, Any]:
    zoo = runner.zoo
    avgs = [runner.in_domain_avg(r) for r in runs]
    return {
        "data_aware": method.data_aware,
        "in_domain_avg": round(statistics.fmean(avgs), 2),
        "std": round(statistics.pstdev(avgs), 2) if len(avgs) > 1 else 0.0,
        "per_task": {t: round(statistics.fmean(r[t] for r in runs), 2) for t in zoo.in_domain},
        "ood": {t: round(statistics.fmean(r[t] for r in runs), 2) for t in zoo.ood},
        "params": {"config": spec.label, "method": spec.method, "parameters": spec.parameters,
                   "per_model": spec.per_model, "importance": list(spec.importance)},
        "validation_in_domain_avg": round(val, 2),
        "grid": dict(tried),
    }


def format_table(result: Mapping[str, Any], zoo: Any) -> str:
    ind, ood = list(zoo.in_domain), list(zoo.ood)
    header = ["method", *ind, "avg ± std", *(f"{t}*" for t in ood)]
    rows = []
    base = result["base"]
    rows.append(["base", *(f"{base[t]:.1f}" for t in ind), f"{statistics.fmean(base[t] for t in ind):.1f}",
                 *(f"{base[t]:.1f}" for t in ood)])
    experts = result["experts"]
    rows.append(["experts (own task)", *(f"{experts[t]:.1f}" for t in ind), f"{result['experts_avg']:.1f}",
                 *([""] * len(ood))])
    for label, m in result["methods"].items():
        mark = " †" if m["data_aware"] else ""
        rows.append([label + mark, *(f"{m['per_task'][t]:.1f}" for t in ind),
                     f"{m['in_domain_avg']:.1f} ± {m['std']:.1f}", *(f"{m['ood'][t]:.1f}" for t in ood)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
    lines = ["".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("test accuracy (%), mean over seeds; † = data-aware; * = out-of-domain task; "
                 "configurations chosen on the validation split")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ ablations


def _own_task_accuracy(runner: Runner, spec: Any, task: str, expert: Path, seed: int = 0) -> float:
    """A single expert pruned (no merge), scored on its own task's test split; cached by content."""
    zoo = runner.zoo
    recipe_dict = spec.recipe(zoo, seed)
    recipe_dict["models"] = [{"model": str(expert), "parameters": dict(spec.per_model or {}), **(
        {"task": task} if spec.importance else {})}]
    recipe = parse_recipe(recipe_dict)
    plan = plan_merge(recipe)
    coefficients = plan.coefficients
    identity = {"recipe": recipe.recipe_hash(), "inputs": plan.input_hashes(),
                "coefficients": [c.key for c in coefficients], "task": task, "limit": runner.limit,
                "data": zoo.manifest["task_info"][task]["splits"]["test"]["sha256"]}
    plan.close()
    matrix = runner.matrix("test")
    key = cache_key("zoo_eval_one", **identity)
    hit = matrix.cache.get("zoo_eval_one", key)
    if hit is not None:
        return json.loads((hit / "score.json").read_text())["acc"]
    model, tok = matrix._load_base()
    model.load_state_dict(merge_state_dict(recipe, coefficients=coefficients or None), strict=True)
    acc = evaluate(model, tok, [task], zoo=zoo, split="test", limit=runner.limit).scores[task].acc
    matrix.cache.get_or_create("zoo_eval_one", key, lambda d: (d / "score.json").write_text(json.dumps({"acc": acc})))
    return acc


def pruning_ablation(runner: Runner, ratios: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.995)) -> dict[str, Any]:
    """APL Fig. 3/4: prune each expert alone (no merge) at equal kept-parameter budgets; own-task test accuracy
    (the paper's claim: DARE keeps an expert intact below p = 0.95, APL's calibrated ratios beat it from there)."""
    s = _spec
    out: dict[str, Any] = {}
    for p in ratios:
        eps = min(0.3, p, 1 - p - 1e-6)
        variants = {
            "dare (= apl model)": s("dare", "dare_linear", {}, {"density": 1 - p}),
            "magnitude": s("magnitude", "magnitude_prune", {}, {"density": 1 - p}),
            "apl layer (causal, linear mapping)": s("apl-layer", "dare_linear", {}, importance=[
                _apl("layer", "causal", "none", p=p, epsilon=eps, mapping="linear")]),
            "apl hidden_state (causal, equal budget)": s("apl-hidden", "dare_linear", {}, importance=[
                _apl("hidden_state", "causal", "none", p=p, epsilon=0.3, preserve_mean_drop=True)]),
            "apl hidden_state (grad, equal budget)": s("apl-hidden-ga", "dare_linear", {}, importance=[
                _apl("hidden_state", "grad", "none", p=p, epsilon=0.3, preserve_mean_drop=True)]),
        }
        row = {}
        for name, spec in variants.items():
            accs = {task: _own_task_accuracy(runner, spec, task, path) for task, path in runner.zoo.experts.items()}
            row[name] = {"avg": round(statistics.fmean(accs.values()), 2), "per_task": accs}
            runner.log(f"  pruning p={p} {name}: {row[name]['avg']:.1f}")
        out[f"p={p}"] = row
    return out


def ood_ablation(runner: Runner, p: float = 0.9) -> dict[str, Any]:
    """APL's out-of-domain claim (§2.7, D-10): for each out-of-domain task, LM-Cocktail's weights from that task's
    few-shot examples, alone, with the task vectors DARE-pruned at ``p``, and pruned at APL's drop ratios (layer,
    causal, every expert scored on the same target examples, mean drop ``p``); the target task's test accuracy, mean ±
    std over seeds. One fixed configuration for all three (the papers' defaults: T = 5, p = 0.9), nothing selected."""
    out: dict[str, Any] = {}
    for target in runner.zoo.ood:
        cocktail = {"estimator": "cocktail", "data": {"target": target}}
        apl = {**_apl("layer", "causal", "none", p=p), "data": {"target": target}}
        variants = {
            "lm_cocktail": _spec("cocktail", "task_arithmetic", {}, importance=[cocktail]),
            "lm_cocktail+dare": _spec(f"cocktail+dare p={p}", "dare_linear", {}, {"density": round(1 - p, 10)},
                                      importance=[cocktail]),
            "lm_cocktail+apl": _spec(f"cocktail+apl p={p}", "dare_linear", {}, importance=[cocktail, apl]),
        }
        row = {}
        for name, spec in variants.items():
            accs = [runner.matrix("test").merge(spec, seed=seed)[target] for seed in range(runner.seeds)]
            row[name] = {"acc": round(statistics.fmean(accs), 2),
                         "std": round(statistics.pstdev(accs), 2) if len(accs) > 1 else 0.0}
            runner.log(f"  ood {target} {name}: {row[name]['acc']:.1f} ± {row[name]['std']:.1f}")
        out[target] = row
    out["mean"] = {name: round(statistics.fmean(out[t][name]["acc"] for t in runner.zoo.ood), 2)
                   for name in ("lm_cocktail", "lm_cocktail+dare", "lm_cocktail+apl")}
    return out


def slta_nonlinearity(runner: Runner, n: int = 30) -> dict[str, Any]:
    """SLTA's premise (Def. 2 / Eq. 19, docs/methods.md §4.5): the non-linearity score of each attention and MLP
    submodule along the path θ_0 → θ_t is lower than that of the whole model (logits as output). Each expert on
    ``n`` calibration examples of its own task; the table's value is the mean over experts (and over the submodules
    of a kind)."""
    from mergeflow.importance.linearity import nonlinearity_score  # the analysis metric, not an estimator

    zoo = runner.zoo
    per_kind: dict[str, list[float]] = {"model": [], "attn": [], "mlp": []}
    for task, expert in zoo.experts.items():
        examples = load_task_data(task, "calib", n, 0, zoo=zoo).examples
        whole = nonlinearity_score(zoo.base, expert, examples, level="model")
        per_kind["model"] += [r.mean for r in whole.values()]
        for pid, r in nonlinearity_score(zoo.base, expert, examples, level="attn_mlp").items():
            kind = "attn" if "attn" in pid else "mlp" if "mlp" in pid else None
            if kind is not None and r.mean == r.mean:  # NaN: the module never moved its output
                per_kind[kind].append(r.mean)
        runner.log(f"  non-linearity {task}: model {per_kind['model'][-1]:.4f}")
    return {kind: round(statistics.fmean(vals), 5) for kind, vals in per_kind.items() if vals}


def shots_ablation(runner: Runner, chosen: Any) -> dict[str, Any]:
    """APL Fig. 5: the number of few-shot examples (0 = plain DARE with the same p and weights)."""
    out = {}
    for n in (0, 1, 5, 10):
        if n == 0:
            p = chosen.importance[0]["parameters"].get("p", 0.9)
            spec = MergeSpec("shots=0", "dare_linear", {"lambda": 1.0 / len(runner.zoo.in_domain)},
                             {"density": 1 - p})
        else:
            imp = [{**i, "data": {**i.get("data", {}), "n": n}} for i in chosen.importance]
            spec = MergeSpec(f"shots={n}", chosen.method, chosen.parameters, chosen.per_model, tuple(imp))
        runs = runner.test(spec)
        avgs = [runner.in_domain_avg(r) for r in runs]
        out[str(n)] = {"in_domain_avg": round(statistics.fmean(avgs), 2),
                       "std": round(statistics.pstdev(avgs), 2) if len(avgs) > 1 else 0.0}
        runner.log(f"  shots={n}: {out[str(n)]['in_domain_avg']:.1f}")
    return out


def importance_heatmaps(runner: Runner, out_dir: Path) -> list[str]:
    """Per-layer importance per task: APL causal layer scores and Sens layer sensitivities (PNG)."""
    import matplotlib  # the optional [eval] extra, and its import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    specs = {
        "apl_layer_causal": (_spec("h", "dare_linear", {}, importance=[_apl("layer", "causal", "none")]), "layer"),
        "sens_alpha": (_spec("h", "task_arithmetic", {}, importance=[_sens()]), "alpha"),
    }
    for name, (spec, score) in specs.items():
        plan = plan_merge(parse_recipe(spec.recipe(runner.zoo, 0)))
        coeffs = plan.coefficients[0]
        plan.close()
        if score not in coeffs.scores:
            continue
        data = coeffs.scores[score].numpy()
        cols = coeffs.score_partitions.get(score, [str(i) for i in range(data.shape[1])])
        fig, ax = plt.subplots(figsize=(0.6 * len(cols) + 3, 0.45 * data.shape[0] + 1.5))
        im = ax.imshow(data, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(data.shape[0]), list(runner.zoo.in_domain))
        fig.colorbar(im, ax=ax, label=score)
        ax.set_title(f"{name}: per-layer importance per task (zoo seed {runner.zoo.seed})")
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"importance_{runner.zoo.size}_{name}.png"  # one file per zoo variant (hard: full)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------ costs


def estimator_costs(runner: Runner, repeats: int = 3) -> dict[str, Any]:
    """Wall time and passes of every estimator on the zoo (uncached), and APL's cost targets against plain passes
    measured in the same process: layer causal ≤ 1.5 × (L + 2) forwards over the few-shot set; the gradient
    approximation ≤ 1.5 × one forward + backward of the base."""
    zoo = runner.zoo

    def ref(path: Path) -> ModelRef:
        snap = resolve(path, scan_finite=False)
        return ModelRef(str(path), snap.path, snap.content_hash)

    base = ref(zoo.base)
    experts = [ref(p) for p in zoo.experts.values()]
    out: dict[str, Any] = {}
    runs = {
        "apl layer causal": ("apl", {"level": "layer", "estimator": "causal", "weights": "mi"}, "fewshot", 5),
        "apl layer grad": ("apl", {"level": "layer", "estimator": "grad"}, "fewshot", 5),
        "apl hidden_state causal": ("apl", {"level": "hidden_state", "estimator": "causal"}, "fewshot", 5),
        "apl hidden_state grad": ("apl", {"level": "hidden_state", "estimator": "grad"}, "fewshot", 5),
        "sens": ("sens", {}, "calib", 100),
        "slta attn_mlp": ("slta", {"level": "attn_mlp"}, "calib", 30),
        "cocktail": ("cocktail", {}, "fewshot", 5),
        "fisher": ("fisher", {}, "calib", 128),
        "regmean": ("regmean", {}, "calib", 128),
        "adamerging layer": ("adamerging", {"level": "layer"}, "calib", 128),
    }
    for label, (est, params, split, n) in runs.items():
        tasks = [load_task_data(t, split, n, 0, zoo=zoo) for t in zoo.in_domain]
        # the best of `repeats` uncached runs: the first one in a process also pays one-time imports and kernel
        # warm-up, which the reference passes below do not (they warm up first)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            c = compute_coefficients(est, base=base, experts=experts, tasks=tasks, params=params, use_cache=False)
            timings.append((time.perf_counter() - start, c.stats.get("load_seconds", 0.0)))
        # the run with the least compute (wall less model reading, which varies with the page cache and the heap)
        seconds, load = min(timings, key=lambda t: t[0] - t[1])
        out[label] = {"seconds": round(seconds, 3), "passes": c.stats.get("passes", {}), "examples_per_task": n,
                      "runs": [round(t, 3) for t, _ in timings], "runs_load": [round(ld, 3) for _, ld in timings]}
        if "load_seconds" in c.stats:  # the estimators report their time reading models from disk
            out[label]["load_seconds"] = load
        runner.log(f"  cost {label}: {seconds:.1f} s, passes {out[label]['passes']}")

    # reference passes, same process: plain forwards over each expert's few-shot set, and the base's fwd+bwd

    tok = AutoTokenizer.from_pretrained(str(zoo.base))
    n_layers = AutoModelForCausalLM.from_pretrained(str(zoo.base)).config.num_hidden_layers

    base_model = AutoModelForCausalLM.from_pretrained(str(zoo.base), dtype=torch.float32).eval()
    experts_in_memory = {task: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
                         for task, path in zoo.experts.items()}
    encoded = {task: encode(tok, load_task_data(task, "fewshot", 5, 0, zoo=zoo).examples) for task in zoo.experts}
    # the estimators' own thread setting (all cores but one): the same kernels, so the ratio compares work done;
    # the best of `repeats` like the estimators (the first round also warms up forward and backward)
    fwd_rounds, bwd_rounds = [], []
    with compute_threads(None):
        for _ in range(repeats):
            fwd_time = bwd_time = 0.0
            for task, model in experts_in_memory.items():
                enc = encoded[task]
                with torch.no_grad():
                    t0 = time.perf_counter()
                    for _ in range(n_layers + 2):
                        model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
                    fwd_time += time.perf_counter() - t0
                t0 = time.perf_counter()
                base_model.zero_grad(set_to_none=True)
                lm_loss(base_model, enc).mean().backward()
                bwd_time += time.perf_counter() - t0
            fwd_rounds.append(fwd_time)
            bwd_rounds.append(bwd_time)
    fwd_time, bwd_time = min(fwd_rounds), min(bwd_rounds)
    def compute(label: str) -> float:  # the estimator's own work: its wall time less reading models from disk
        return out[label]["seconds"] - out[label].get("load_seconds", 0.0)

    causal = out["apl layer causal"]["seconds"]
    grad = out["apl layer grad"]["seconds"]
    out["targets"] = {
        "apl_layer_causal_vs_(L+2)_forwards": round(compute("apl layer causal") / fwd_time, 2),
        "apl_grad_vs_forward_backward": round(compute("apl layer grad") / bwd_time, 2),
        "with_model_loading": {"apl_layer_causal_vs_(L+2)_forwards": round(causal / fwd_time, 2),
                               "apl_grad_vs_forward_backward": round(grad / bwd_time, 2)},
        "reference_seconds": {"(L+2) forwards, all experts": round(fwd_time, 3),
                              "base forward+backward, all tasks": round(bwd_time, 3)},
        "note": "the targets compare the estimator's wall time less its model loading with plain passes over the "
                "same few-shot sets on models already in memory ('with_model_loading': the estimator's whole wall "
                "time); both run with the estimators' thread setting (all cores but one), both the best of "
                f"{repeats} (the estimator's: the run with the least compute)",
    }
    return out


# ------------------------------------------------------------------------------------------------ main


def run(zoo_dir: Path | None, seeds: int, limit: int | None, ablations: bool, out_dir: Path,
        only: Sequence[str] = (), partial: Path | None = None, costs: bool = True) -> dict[str, Any]:
    """The benchmark; ``partial`` is rewritten after every method so a long run's progress is never lost."""
    zoo = Zoo.load(zoo_dir) if zoo_dir else build_zoo(size="full", seed=0)
    runner = Runner(zoo, limit, seeds)
    start = time.perf_counter()
    test = runner.matrix("test")
    base = test.checkpoint(zoo.base)
    experts_matrix = {"models": {f"expert:{t}": test.checkpoint(p) for t, p in zoo.experts.items()},
                      "tasks": {"in_domain": list(zoo.in_domain), "ood": list(zoo.ood)}}
    experts = experts_row(experts_matrix)
    result: dict[str, Any] = {
        "zoo": {"root": str(zoo.root), "size": zoo.size, "seed": zoo.seed,
                "recipe_sha256": zoo.manifest.get("recipe_sha256")},
        "protocol": {"budget": BUDGET, "selection": "validation in-domain average, seed 0", "seeds": seeds,
                     "limit": limit},
        "base": base,
        "experts": experts,
        "experts_avg": round(statistics.fmean(experts.values()), 2),
        "methods": {},
    }
    chosen: dict[str, Any] = {}
    for method in method_table():
        if only and not any(o in method.label for o in only):
            continue
        t0 = time.perf_counter()
        spec, val, tried = runner.select(method)
        runs = runner.test(spec)
        result["methods"][method.label] = summarize(runner, method, spec, val, tried, runs)
        chosen[method.label] = spec
        m = result["methods"][method.label]
        runner.log(f"{method.label}: test {m['in_domain_avg']:.1f} ± {m['std']:.1f} with {spec.label} "
                   f"({time.perf_counter() - t0:.0f} s)")
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({**result, "targets": targets(result), "partial": True}, indent=1) + "\n")
    result["targets"] = targets(result)
    if ablations:
        result["ablations"] = {"pruning": pruning_ablation(runner), "ood": ood_ablation(runner),
                               "slta_nonlinearity": slta_nonlinearity(runner)}
        best_apl = chosen.get("mi-ta+apl (layer, causal)")
        if best_apl is not None:
            result["ablations"]["shots"] = shots_ablation(runner, best_apl)
        result["heatmaps"] = importance_heatmaps(runner, out_dir)
        if costs:
            result["costs"] = estimator_costs(runner)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def targets(result: Mapping[str, Any]) -> dict[str, Any]:
    methods = result["methods"]
    free = {k: v["in_domain_avg"] for k, v in methods.items() if not v["data_aware"]}
    aware = {k: v["in_domain_avg"] for k, v in methods.items() if v["data_aware"]}
    if not free or not aware:
        return {}
    best_free = max(free, key=free.get)
    best_aware = max(aware, key=aware.get)
    gap = result["experts_avg"] - free[best_free]
    closed = (aware[best_aware] - free[best_free]) / gap if gap > 0 else float("nan")
    return {
        "best_data_free": [best_free, free[best_free]],
        "best_data_aware": [best_aware, aware[best_aware]],
        "margin_points": round(aware[best_aware] - free[best_free], 2),
        "margin_target_3_points": aware[best_aware] - free[best_free] >= 3,
        "gap_closed_fraction": round(closed, 3),
        "gap_target_one_third": closed >= 1 / 3,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="a zoo built by `mergeflow zoo build` (default: "
                        "the full zoo, seed 0, built if missing)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--ood-only", action="store_true", help="run only the ablations added after the main "
                        "table (out-of-domain LM-Cocktail, SLTA's non-linearity scores) and the heatmaps, and write them "
                        "into the --json file")
    parser.add_argument("--skip-costs", action="store_true", help="do not time the estimators (timings need an "
                        "idle machine; measure them apart with --costs-only)")
    parser.add_argument("--only", action="append", default=[], help="only methods whose label contains this")
    parser.add_argument("--costs-only", action="store_true", help="measure the estimators' costs only and write "
                        "them into the --json file (replacing its costs)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "quality")
    args = parser.parse_args(argv)

    if args.ood_only:  # the later ablations alone, written into the --json file's ablations
        zoo = Zoo.load(args.zoo) if args.zoo else build_zoo(size="full", seed=0)
        runner = Runner(zoo, args.limit, args.seeds)
        extra = {"ood": ood_ablation(runner), "slta_nonlinearity": slta_nonlinearity(runner)}
        print(json.dumps(extra, indent=1))
        heatmaps = importance_heatmaps(runner, args.out)
        if args.json:
            previous = json.loads(args.json.read_text()) if args.json.exists() else {}
            previous.setdefault("ablations", {}).update(extra)
            previous["heatmaps"] = heatmaps
            args.json.write_text(json.dumps(previous, indent=1) + "\n")
        return 0
    if args.costs_only:
        zoo = Zoo.load(args.zoo) if args.zoo else build_zoo(size="full", seed=0)
        costs = estimator_costs(Runner(zoo, args.limit, args.seeds))
        print(json.dumps(costs, indent=1))
        if args.json:
            previous = json.loads(args.json.read_text()) if args.json.exists() else {}
            args.json.write_text(json.dumps({**previous, "costs": costs}, indent=1) + "\n")
        return 0
    try:
        result = run(args.zoo, args.seeds, args.limit, not args.skip_ablations, args.out, args.only,
                     partial=args.json.with_suffix(".partial.json") if args.json else None, costs=not args.skip_costs)
    except MergeflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    zoo = Zoo.load(result["zoo"]["root"])
    print(format_table(result, zoo))
    print(json.dumps({"targets": result.get("targets"), "costs": result.get("costs", {}).get("targets")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
