"""The quality benchmark's two regimes side by side, and the three papers' claims checked regime by regime.

    python benchmarks/claims.py --regime hard=results/quality-hard-full-seed0.json \
                                --regime sft=results/quality-sft-full-seed0.json [--markdown OUT]

Reads the JSON that ``benchmarks/quality.py --json`` writes for each regime (nothing is re-run) and prints two
Markdown tables: every method's test in-domain mean ± std and normalized accuracy (mean / the experts' own-task
average) in each regime, then each claim with "reproduced" / "not reproduced" / "within noise" (see ``NOISE_FLOOR``)
and the numbers that decide it. A claim whose rows are missing from a JSON (an older run) says "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Result = Mapping[str, Any]
# a claim: (paper, statement, check(result) -> (held: bool | None, the numbers as text))
Claim = tuple[str, str, Callable[[Result], tuple[bool | str | None, str]]]


def _avg(result: Result, label: str) -> float | None:
    m = result["methods"].get(label)
    return None if m is None else float(m["in_domain_avg"])


def _std(result: Result, label: str) -> float | None:
    m = result["methods"].get(label)
    return None if m is None else float(m["std"])


def _show(result: Result, label: str) -> str:
    avg, std = _avg(result, label), _std(result, label)
    return f"{label} {avg:.1f} ± {std:.1f}" if avg is not None else f"{label} (not run)"


# a difference of test in-domain means decides a claim only beyond this noise: the seeds' spread of the two rows
# (√(σ_a² + σ_b²)) and at least half a point (6 × 1000 test examples: a binomial standard error of about 0.6 points
# for one unpaired average)
NOISE_FLOOR = 0.5
WITHIN_NOISE = "within noise"


def beats(winners: Sequence[str], losers: Sequence[str]) -> Callable[[Result], tuple[bool | str | None, str]]:
    """Every row of ``winners`` has a higher test in-domain mean than every row of ``losers``, beyond the noise;
    "within noise" when no pair loses beyond it but some pair does not win beyond it."""

    def check(result: Result) -> tuple[bool | str | None, str]:
        labels = [*winners, *losers]
        text = "; ".join(_show(result, lbl) for lbl in labels)
        if any(_avg(result, lbl) is None for lbl in labels):
            return None, text
        margins = []
        for w in winners:
            for lo in losers:
                noise = max(NOISE_FLOOR, (_std(result, w) ** 2 + _std(result, lo) ** 2) ** 0.5)  # type: ignore[operator]
                margins.append((_avg(result, w) - _avg(result, lo)) / noise)  # type: ignore[operator]
        if all(m > 1 for m in margins):
            return True, text
        return (False if any(m < -1 for m in margins) else WITHIN_NOISE), text

    return check


def _pruning(result: Result) -> dict[str, Any] | None:
    return (result.get("ablations") or {}).get("pruning")


def dare_intact(result: Result) -> tuple[bool | None, str]:
    """DARE alone keeps single experts intact below p = 0.95: own-task average within 2 points of the experts'."""
    pruning = _pruning(result)
    if not pruning:
        return None, "pruning ablation not run"
    experts = float(result["experts_avg"])
    below = [k for k in pruning if float(k.split("=")[1]) < 0.95]
    if not below:
        return None, "no drop ratio below 0.95 in the ablation"
    accs = {k: pruning[k]["dare (= apl model)"]["avg"] for k in below}
    text = f"experts {experts:.1f}; DARE alone " + ", ".join(f"{k} {v:.1f}" for k, v in accs.items())
    return all(v >= experts - 2.0 for v in accs.values()), text


def apl_beats_dare_when_pruning_hard(result: Result) -> tuple[bool | None, str]:
    """APL's calibrated drop ratios (layer, linear mapping) beat DARE at p ∈ {0.95, 0.99, 0.995} (Figure 3)."""
    pruning = _pruning(result)
    if not pruning:
        return None, "pruning ablation not run"
    wanted = [f"p={p}" for p in (0.95, 0.99, 0.995)]
    missing = [k for k in wanted if k not in pruning]
    if missing:
        return None, f"ablation has no {', '.join(missing)}"
    pairs = {k: (pruning[k]["apl layer (causal, linear mapping)"]["avg"], pruning[k]["dare (= apl model)"]["avg"])
             for k in wanted}
    text = ", ".join(f"{k}: APL {a:.1f} vs DARE {d:.1f}" for k, (a, d) in pairs.items())
    return all(a > d for a, d in pairs.values()), text


def finer_levels_beat_model_level(result: Result) -> tuple[bool | None, str]:
    """Layer and hidden-state levels beat the model level: in the pruning ablation at equal kept budgets (p ≥ 0.9;
    the model level is DARE's uniform p) and in the merges (MI-TA+APL at layer / hidden-state level vs MI-TA)."""
    pruning = _pruning(result)
    parts = []
    held = True
    if pruning:
        for k in sorted(pruning, key=lambda k: float(k.split("=")[1])):
            if float(k.split("=")[1]) < 0.9:
                continue
            row = pruning[k]
            d = row["dare (= apl model)"]["avg"]
            for name in ("apl layer (causal, linear mapping)", "apl hidden_state (causal, equal budget)"):
                held &= row[name]["avg"] > d
            parts.append(f"{k}: layer {row['apl layer (causal, linear mapping)']['avg']:.1f}, hidden "
                         f"{row['apl hidden_state (causal, equal budget)']['avg']:.1f}, model {d:.1f}")
    merged, text = beats(["mi-ta+apl (layer, causal)", "mi-ta+apl (hidden_state, causal)"], ["mi-ta"])(result)
    parts.append("merges: " + text)
    if merged is None or not pruning:
        return None, "; ".join(parts)
    return (held and merged is True), "; ".join(parts)


def ood_order(result: Result) -> tuple[bool | None, str]:
    """Out of domain: LM-Cocktail + APL > LM-Cocktail + DARE > LM-Cocktail (mean over the out-of-domain tasks)."""
    ood = (result.get("ablations") or {}).get("ood")
    if not ood:
        return None, "out-of-domain ablation not run"
    m = ood["mean"]
    text = (f"+APL {m['lm_cocktail+apl']:.1f}, +DARE {m['lm_cocktail+dare']:.1f}, alone {m['lm_cocktail']:.1f} "
            "(mean over the out-of-domain tasks' test accuracy)")
    return m["lm_cocktail+apl"] > m["lm_cocktail+dare"] > m["lm_cocktail"], text


def slta_nonlinearity(result: Result) -> tuple[bool | None, str]:
    """SLTA: submodules' non-linearity scores are lower than the whole model's (from the estimator's stats, when
    the benchmark recorded them)."""
    scores = (result.get("ablations") or {}).get("slta_nonlinearity")
    if not scores:
        return None, "non-linearity scores not recorded by this run"
    model = scores["model"]
    subs = {k: v for k, v in scores.items() if k != "model"}
    text = f"model {model:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in subs.items())
    return all(v < model for v in subs.values()), text


CLAIMS: list[Claim] = [
    ("APL", "DARE keeps single experts intact below p = 0.95", dare_intact),
    ("APL", "APL's calibrated drop ratios beat DARE at p ∈ {0.95, 0.99, 0.995} (Fig. 3, layer, linear mapping)",
     apl_beats_dare_when_pruning_hard),
    ("APL", "layer and hidden-state levels beat the model level", finer_levels_beat_model_level),
    ("APL", "MI-TA beats TA", beats(["mi-ta"], ["task_arithmetic"])),
    ("APL", "TA + APL beats TA + DARE and TIES", beats(["ta+apl (layer, causal)"], ["dare", "ties"])),
    ("APL", "MI-TA + APL beats DARE and TIES", beats(["mi-ta+apl (layer, causal)"], ["dare", "ties"])),
    ("APL", "out of domain: LM-Cocktail + APL > + DARE > LM-Cocktail", ood_order),
    ("Sens", "TA + Sens beats TA", beats(["ta+sens"], ["task_arithmetic"])),
    ("Sens", "TIES + Sens beats TIES", beats(["ties+sens"], ["ties"])),
    ("Sens", "DARE + Sens beats DARE", beats(["dare+sens"], ["dare"])),
    ("Sens", "TA + Sens beats each factor's ablation", beats(
        ["ta+sens"], ["ta+sens (task-specific only)", "ta+sens (cross-task only)"])),
    ("SLTA", "layer and attn-MLP levels beat TA", beats(["slta (layer)", "slta (attn_mlp)"], ["task_arithmetic"])),
    ("SLTA", "submodules' non-linearity scores are lower than the whole model's", slta_nonlinearity),
]


def side_by_side(results: Mapping[str, Result]) -> str:
    regimes = list(results)
    labels: list[str] = []
    for r in results.values():
        labels += [lbl for lbl in r["methods"] if lbl not in labels]
    head = "| method | " + " | ".join(f"{g}: in-domain ± std | {g}: normalized" for g in regimes) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(regimes))]
    for name, key in (("base", "base"), ("experts (own task)", "experts")):
        cells = []
        for r in results.values():
            vals = r[key]
            avg = sum(vals[t] for t in r["experts"]) / len(r["experts"])
            cells += [f"{avg:.1f}", f"{avg / r['experts_avg']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for lbl in labels:
        aware = any(r["methods"].get(lbl, {}).get("data_aware") for r in results.values())
        cells = []
        for r in results.values():
            m = r["methods"].get(lbl)
            cells += ([f"{m['in_domain_avg']:.1f} ± {m['std']:.1f}", f"{m['in_domain_avg'] / r['experts_avg']:.3f}"]
                      if m else ["–", "–"])
        lines.append(f"| {lbl}{' †' if aware else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(results: Mapping[str, Result]) -> str:
    regimes = list(results)
    lines = ["| paper | claim | " + " | ".join(regimes) + " |", "|" + "---|" * (2 + len(regimes))]
    for paper, statement, check in CLAIMS:
        cells = []
        for r in results.values():
            held, text = check(r)
            verdict = {True: "**reproduced**", False: "**not reproduced**", None: "not measured",
                       WITHIN_NOISE: "within noise"}[held]
            cells.append(f"{verdict}: {text}")
        lines.append(f"| {paper} | {statement} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", action="append", required=True, metavar="NAME=JSON",
                        help="a regime's name and its quality.py JSON (repeat, in the tables' column order)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the two tables to this file")
    args = parser.parse_args(argv)
    results: dict[str, Result] = {}
    for item in args.regime:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--regime {item!r}: expected NAME=JSON")
        try:
            results[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    text = side_by_side(results) + "\n\n" + claims_table(results) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
