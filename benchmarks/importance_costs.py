"""What a GPU worker needs for the importance stage at 3B and 7B: every estimator's passes, time and peak memory.

No weights on disk: each shape is a transformers config (Llama-3.2-3B: GQA 24/8 heads, 128256-token tied embedding;
Llama-2-7B: 32 heads, 32000-token untied head). The tensor shapes come from a model built on the meta device, the
passes from each estimator's declared plan (mergeflow/importance/costs.py) at its default parameters, and the time
from one decoder layer with random weights timed on this machine (``--device``) at two small shapes, extrapolated
linearly in tokens to the passes' shapes (matmul-bound at these widths). Memory is what must fit on the device.

    .venv/bin/python benchmarks/importance_costs.py [--experts 3] [--length 256] [--device cpu]
        [--json benchmarks/results/importance_costs.json] [--markdown benchmarks/results/importance_costs.md]
    .venv/bin/python benchmarks/importance_costs.py --validate-zoo zoo:full   # estimate vs real runs on the zoo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergeflow.architecture import Architecture
from mergeflow.importance.base import get_estimator
from mergeflow.importance.costs import (
    CostEstimateError,
    PlanInputs,
    TaskShape,
    estimate,
    measure_layer_costs,
    parameter_count,
)

SHAPES = {
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5},
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}

# each estimator at its defaults (and the recipes' usual level), with its default number of examples per task
ENTRIES = [
    ("apl", {"level": "layer", "estimator": "causal"}),
    ("apl", {"level": "layer", "estimator": "grad"}),
    ("sens", {}),
    ("slta", {"level": "attn_mlp"}),
    ("cocktail", {}),
    ("fisher", {}),
    ("regmean", {}),
    ("adamerging", {"level": "layer"}),
]


def architecture(config: dict) -> Architecture:
    """The architecture of ``config`` from the tensor shapes of a model built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)  # a checkpoint stores the tied head once, as the embedding
    return Architecture.infer(config, shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--length", type=int, default=256, help="tokens per example (prompt + answer)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="1x64,4x128", help="rows×width timed per kind (at most two)")
    ap.add_argument("--only", default=None, help="one model shape")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/importance_costs.json"))
    ap.add_argument("--markdown", type=Path, default=Path("benchmarks/results/importance_costs.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown table from the JSON")
    ap.add_argument("--validate-zoo", default=None, metavar="ZOO",
                    help="instead: estimate and run every estimator on ZOO (e.g. zoo:full), three experts")
    args = ap.parse_args()
    if args.validate_zoo:
        rows = validate_zoo(args.validate_zoo, ["sentiment", "topic", "nli"], args.device)
        out = args.json.with_name("importance_costs_zoo_validation.json")
        out.write_text(json.dumps({"zoo": args.validate_zoo, "device": args.device,
                                   "load_average": os.getloadavg()[0], "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")
        return
    if args.render_only:
        args.markdown.write_text(render(json.loads(args.json.read_text())))
        print(f"wrote {args.markdown}")
        return
    timed = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    report = {"device": args.device, "threads": max(1, (os.cpu_count() or 2) - 1), "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "experts": args.experts,
              "tokens_per_example": args.length, "timed_shapes": [f"{r}x{w}" for r, w in timed],
              "load_average": os.getloadavg()[0], "models": {}}
    for name, config in SHAPES.items():
        if args.only and name != args.only:
            continue
        arch = architecture(config)
        start = time.perf_counter()
        costs = measure_layer_costs(config, {"forward": timed, "backward": timed}, device=args.device,
                                    repeats=2, budget_s=60.0)
        rows = []
        for estimator, params in ENTRIES:
            est = get_estimator(estimator)
            resolved = est.resolve_params(params)
            n = est.default_n or 128
            tasks = tuple(TaskShape(f"task{i}", (args.length,) * n) for i in range(args.experts))
            try:
                e = estimate(estimator, PlanInputs(resolved, tasks, arch, torch.device(args.device).type),
                             config, costs=costs)
            except CostEstimateError as exc:
                rows.append({"estimator": estimator, "params": params, "error": str(exc)})
                continue
            d = e.describe()
            d["examples_per_task"] = n
            d["label"] = f"{estimator} " + " ".join(f"{k}={v}" for k, v in params.items())
            d.pop("measured")
            rows.append(d)
        report["models"][name] = {"config": config, "parameters": parameter_count(arch),
                                  "measured": costs.describe(), "measure_seconds": round(time.perf_counter() - start, 1),
                                  "estimates": rows}
        print(render({**report, "models": {name: report["models"][name]}}), flush=True)
    report["load_average_end"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.markdown.write_text(render(report))
    print(f"wrote {args.json} and {args.markdown}")


ZOO_CHECKS = [
    ("apl", {"level": "layer", "estimator": "causal"}),
    ("apl", {"level": "hidden_state", "estimator": "grad"}),
    ("sens", {}),
    ("slta", {"level": "attn_mlp"}),
    ("cocktail", {}),
    ("fisher", {}),
    ("regmean", {}),
    ("adamerging", {"level": "layer", "steps": 40}),
]


def validate_zoo(zoo: str, tasks: list[str], device: str) -> list[dict]:
    """Estimate, then run, each of ``ZOO_CHECKS`` on the zoo's base and experts of ``tasks`` (nothing cached):
    the estimate's time against the measurement's own (model loading excluded)."""
    from mergeflow.engine import resolve_inputs
    from mergeflow.importance.base import ModelRef, compute_coefficients
    from mergeflow.importance.recipes import importance_estimates, importance_tasks
    from mergeflow.recipe import parse_recipe

    rows = []
    for estimator, params in ZOO_CHECKS:
        recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": f"{zoo}/base",
                               "models": [{"model": f"{zoo}/{t}", "task": t} for t in tasks],
                               "importance": [{"estimator": estimator, "parameters": params, "data": {"zoo": zoo}}]})
        inputs, _ = resolve_inputs(recipe)
        (est,) = importance_estimates(recipe, inputs.base.path, device=device)
        spec = recipe.importance[0]
        data = importance_tasks(spec, tasks, len(tasks), recipe.resolve_reference)

        def ref(snap):
            return ModelRef(snap.reference, snap.path, snap.content_hash)

        coeffs = compute_coefficients(estimator, base=ref(inputs.base), experts=[ref(e) for e in inputs.experts],
                                      tasks=data, params=params, device=device, use_cache=False)
        parts = coeffs.stats.get("measurements", {}).get("parts")
        total = sum(p["seconds"] for p in parts.values()) if parts else coeffs.stats["seconds"]
        real = total - coeffs.stats["load_seconds"]
        rows.append({"estimator": estimator, "params": params, "estimate_seconds": est["seconds"],
                     "real_seconds": round(real, 3), "ratio": round(est["seconds"] / real, 3),
                     "recorded_passes": coeffs.stats["passes"], "planned_passes": est["passes"]["recorded"]})
        ratio = est["seconds"] / real
        rows[-1]["within_3x"] = 1 / 3 <= ratio <= 3
        print(f"{'PASS' if rows[-1]['within_3x'] else 'FAIL'}  {estimator} {params}: estimate {est['seconds']:.2f} s, "
              f"real {real:.2f} s, ratio {ratio:.2f} (target: within 3×)", flush=True)
    return rows


def render(report: dict) -> str:
    lines = [f"Importance stage, {report['experts']} experts, {report['tokens_per_example']} tokens per example, each "
             f"estimator at its defaults (benchmarks/importance_costs.py; one layer timed on {report['device']} with "
             f"{report['threads']} thread(s) of {report['cpu_count']}, load average {report.get('load_average', float('nan')):.1f})"]
    for name, m in report["models"].items():
        lines += [f"\n**{name}** ({m['parameters'] / 1e9:.2f} B parameters)\n",
                  "| estimator | examples/task | forward | backward | tokens | time here | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for d in m["estimates"]:
            if "error" in d:
                lines.append(f"| {d['estimator']} | | | | | {d['error']} | |")
                continue
            p = d["passes"]
            lines.append(f"| {d['label'].strip()} | {d['examples_per_task']} | {p['forward']:,} | {p['backward']:,} | "
                         f"{p['tokens']:,} | {_duration(d['seconds'])} | {d['peak_memory_bytes'] / 1e9:.1f} GB |")
    return "\n".join(lines) + "\n"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


if __name__ == "__main__":
    main()
