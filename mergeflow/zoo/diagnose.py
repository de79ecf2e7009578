"""`mergeflow zoo diagnose`: which merging regime a zoo is in, measured on its test split.

Merging methods are designed for a regime, and a benchmark only says something about a method in the regime its
premises hold. The report measures those premises on any zoo:

- ``base`` and ``experts_own``: accuracy (%) of the base on every in-domain task and of each expert on its own task;
- ``dare_retention[p]``: the mean over experts of (own-task accuracy of the expert pruned by DARE at drop rate p −
  base) / (expert − base), each expert alone (``dare_linear``, weight 1, λ 1: θ_b + Bernoulli(1−p) mask · τ / (1−p));
  about 1 where, as for 7B SFT experts, DARE drops 90 % of a task vector without loss;
- ``ta_normalized``: the best in-domain average of task arithmetic (θ_b + λ Σ τ_i) over λ ∈ {0.3, 0.5, 0.7, 1.0},
  divided by the experts' own-task average, and ``ta_best_lambda`` the λ that gave it;
- ``task_vector_cosine_mean``: the mean pairwise cosine of the flattened task vectors (every tensor), and
  ``task_vector_rel_norm`` the mean ‖τ_i‖ / ‖θ_b‖.

Merges run through the engine in memory (the same kernels as ``mergeflow merge``), evaluations through lm-eval.
Experts that do not beat the base on their own task have no defined retention and are left out of its mean (the
printed report shows every expert's pruned accuracy). The JSON has exactly ``REPORT_KEYS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mergeflow.checkpoints import resolve
from mergeflow.engine import merge_state_dict
from mergeflow.evaluation import evaluate
from mergeflow.recipe import parse_recipe
from mergeflow.transformers_io import load_causal_lm
from mergeflow.zoo.build import Zoo

DARE_DROPS = (0.9, 0.95, 0.99)
TA_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
REPORT_KEYS = ("regime", "tasks", "base", "experts_own", "dare_retention", "ta_normalized", "ta_best_lambda",
               "task_vector_cosine_mean", "task_vector_rel_norm")

# What the SFT regime promises (issue 11's premise targets); `check_premises` reports each.
SFT_PREMISES = {"expert_gain": 20.0, "expert_floor": 90.0, "experts_at_floor": 5, "dare_retention_0.9": 0.90,
                "ta_normalized": (0.65, 0.88)}


def _state(path: Any) -> dict[str, torch.Tensor]:
    snap = resolve(path, scan_finite=False)
    state: dict[str, torch.Tensor] = {}
    for f in snap.weight_files:
        state.update(load_file(snap.path / f))
    return {k: v.float() for k, v in state.items()}


class _Scorer:
    """One model object whose weights are swapped per evaluation (the zoo's models are small)."""

    def __init__(self, zoo: Zoo, split: str, limit: int | None) -> None:
        self.zoo, self.split, self.limit = zoo, split, limit
        self.model = load_causal_lm(zoo.base)
        self.tokenizer = AutoTokenizer.from_pretrained(zoo.base)

    def __call__(self, state: Mapping[str, torch.Tensor], tasks: Iterable[str]) -> dict[str, float]:
        self.model.load_state_dict(dict(state), strict=True)
        tasks = list(tasks)
        result = evaluate(self.model, self.tokenizer, tasks, zoo=self.zoo, split=self.split, limit=self.limit)
        return {t: result.scores[t].acc for t in tasks}


def _recipe(zoo: Zoo, method: str, experts: Mapping[str, Mapping[str, Any]], lam: float, seed: int) -> Any:
    return parse_recipe({
        "merge_method": method,
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.member(task)), "parameters": dict(params)} for task, params in experts.items()],
        "parameters": {"lambda": lam},
        "seed": seed,
        "name": f"zoo diagnose {method}",
    })


def task_vector_geometry(base: Mapping[str, torch.Tensor],
                         experts: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[float, float]:
    """(mean pairwise cosine of the flattened task vectors, mean ‖τ_i‖ / ‖θ_b‖), over every tensor, in float64."""
    names = sorted(base)
    base_sq = sum(float(base[n].double().pow(2).sum()) for n in names)
    tasks = list(experts)
    norms_sq = {t: 0.0 for t in tasks}
    dots = {(a, b): 0.0 for i, a in enumerate(tasks) for b in tasks[i + 1:]}
    for n in names:  # tensor by tensor: no K flattened copies of the model in memory
        taus = {t: (experts[t][n].double() - base[n].double()).flatten() for t in tasks}
        for t in tasks:
            norms_sq[t] += float(taus[t] @ taus[t])
        for a, b in dots:
            dots[a, b] += float(taus[a] @ taus[b])
    cosines = [dot / math.sqrt(norms_sq[a] * norms_sq[b]) if norms_sq[a] and norms_sq[b] else 0.0
               for (a, b), dot in dots.items()]
    cos_mean = sum(cosines) / len(cosines) if cosines else float("nan")
    rel = sum(math.sqrt(norms_sq[t] / base_sq) for t in tasks) / len(tasks)
    return cos_mean, rel


def diagnose(zoo: Zoo, *, split: str = "test", limit: int | None = None, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The regime report of ``zoo`` (keys ``REPORT_KEYS``, accuracies in %); DARE masks drawn with ``seed``."""
    log = progress or (lambda msg: None)
    tasks = list(zoo.in_domain)
    score = _Scorer(zoo, split, limit)
    base_state = _state(zoo.base)
    log("base")
    base = score(base_state, tasks)
    experts_own: dict[str, float] = {}
    expert_states: dict[str, dict[str, torch.Tensor]] = {}
    for task in tasks:
        log(f"expert {task}")
        expert_states[task] = _state(zoo.member(task))
        experts_own[task] = score(expert_states[task], [task])[task]
    cosine, rel_norm = task_vector_geometry(base_state, expert_states)
    del expert_states

    dare: dict[str, dict[str, float]] = {}
    for p in DARE_DROPS:
        for task in tasks:
            log(f"DARE p={p} {task}")
            recipe = _recipe(zoo, "dare_linear", {task: {"weight": 1.0, "density": round(1.0 - p, 10)}}, 1.0, seed)
            dare.setdefault(task, {})[str(p)] = score(merge_state_dict(recipe), [task])[task]
    retention: dict[str, float | None] = {}
    for p in DARE_DROPS:
        ratios = [(dare[t][str(p)] - base[t]) / (experts_own[t] - base[t]) for t in tasks if experts_own[t] > base[t]]
        retention[str(p)] = round(sum(ratios) / len(ratios), 4) if ratios else None

    experts_avg = sum(experts_own.values()) / len(tasks)
    ta: dict[float, float] = {}
    for lam in TA_LAMBDAS:
        log(f"task arithmetic λ={lam}")
        recipe = _recipe(zoo, "task_arithmetic", {t: {"weight": 1.0} for t in tasks}, lam, seed)
        scores = score(merge_state_dict(recipe), tasks)
        ta[lam] = sum(scores.values()) / len(tasks)
    best_lambda = max(TA_LAMBDAS, key=lambda lam: (ta[lam], -lam))
    return {
        "regime": zoo.regime,
        "tasks": tasks,
        "base": {t: round(v, 2) for t, v in base.items()},
        "experts_own": {t: round(v, 2) for t, v in experts_own.items()},
        "dare_retention": retention,
        "ta_normalized": round(ta[best_lambda] / experts_avg, 4),
        "ta_best_lambda": best_lambda,
        "task_vector_cosine_mean": round(cosine, 4),
        "task_vector_rel_norm": round(rel_norm, 5),
        "details": {"dare": dare, "ta": {str(lam): round(v, 2) for lam, v in ta.items()}},
    }


def check_premises(report: Mapping[str, Any]) -> list[tuple[str, bool, str]]:
    """Each premise of the SFT regime as (what, holds, the measured value)."""
    t = SFT_PREMISES
    base, own = report["base"], report["experts_own"]
    gains = {task: own[task] - base[task] for task in report["tasks"]}
    at_floor = sum(v >= t["expert_floor"] for v in own.values())
    ret = report["dare_retention"].get("0.9")
    lo, hi = t["ta_normalized"]
    ta = report["ta_normalized"]
    return [
        (f"every expert >= base + {t['expert_gain']:g} on its own task", min(gains.values()) >= t["expert_gain"],
         f"smallest gain {min(gains.values()):+.1f} ({min(gains, key=gains.__getitem__)})"),
        (f"experts >= {t['expert_floor']:g} % on at least {t['experts_at_floor']} tasks",
         at_floor >= min(t["experts_at_floor"], len(own)), f"{at_floor} of {len(own)}"),
        (f"DARE retention at p = 0.9 >= {t['dare_retention_0.9']}", ret is not None and ret >= t["dare_retention_0.9"],
         f"{ret}"),
        (f"task arithmetic keeps {lo}-{hi} of the experts", lo <= ta <= hi, f"{ta}"),
    ]


def format_report(report: Mapping[str, Any]) -> str:
    tasks = report["tasks"]
    width = max(len(t) for t in [*tasks, "task"])
    details = report.get("details", {})
    drops = [str(p) for p in DARE_DROPS]
    lines = [f"regime {report['regime']} — test-split accuracy %, DARE: the expert alone pruned at drop p",
             f"{'task':<{width}}  {'base':>6}  {'expert':>6}  " + "  ".join(f"{'dare ' + p:>9}" for p in drops)]
    for t in tasks:
        dare = details.get("dare", {}).get(t, {})
        lines.append(f"{t:<{width}}  {report['base'][t]:6.1f}  {report['experts_own'][t]:6.1f}  "
                     + "  ".join(f"{dare.get(p, float('nan')):9.1f}" for p in drops))
    ret = report["dare_retention"]
    lines.append("DARE retention     " + "  ".join(f"p={p}: {ret[p]}" for p in drops))
    ta = details.get("ta", {})
    lines.append("task arithmetic    " + "  ".join(f"λ={lam}: {v:.1f}" for lam, v in ta.items())
                 + f"   normalized {report['ta_normalized']} (λ={report['ta_best_lambda']})")
    lines.append(f"task vectors       cosine mean {report['task_vector_cosine_mean']}, "
                 f"‖τ‖/‖θ_base‖ {report['task_vector_rel_norm']}")
    lines.append("SFT-regime premises:")
    for what, ok, value in check_premises(report):
        lines.append(f"  [{'ok' if ok else 'NO'}] {what}: {value}")
    return "\n".join(lines)


def public_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with exactly ``REPORT_KEYS`` (what ``--json`` writes)."""
    return {k: report[k] for k in REPORT_KEYS}
