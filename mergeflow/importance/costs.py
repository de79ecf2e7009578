"""What an importance entry will cost before it runs: its passes, their time on this machine, its peak memory.

Each estimator declares a *plan* next to its registration (:func:`declare_plan`): a function of the resolved
parameters, the number of experts, the shapes of the task data (token lengths of every example, after the data
loader's limits) and the architecture, returning the passes it will make and what it holds in memory at once. A pass
says which model runs (base, expert or merged), on how many sequences of what padded width, whether it is followed by
a backward, how many decoder layers it really computes (APL's prefix reuse skips blocks, SLTA runs one module at a
time) and what the estimator records for it with ``run.count`` — so a test can check the declared passes against the
ones a real run records (tests/test_importance_costs.py), which is what makes the estimates trustworthy.

Time is not guessed: :func:`measure_layer_costs` builds the recipe's own architecture from its config with **one**
decoder layer and random weights (transformers), on the device the importance stage would use, and times that
layer's forward (no grad) and forward + backward, and the rest of the model (embedding, final norm, LM head and the
log-softmax over the vocabulary), at the passes' batch × sequence shapes, a few repeats, median. A pass then costs
``layers × layer(shape) + rest(shape)``; shapes between the measured ones are interpolated linearly in tokens. Only
one layer is built, so a 7B-shaped model needs about one layer plus its embeddings in memory to be timed.

Memory is a formula, not a measurement: the models held (fp32, as ``ImportanceRun.load_model`` loads them), the
estimator's own buffers (gradients, per-example gradients, Fisher diagonals, Gram matrices, task vectors, captured
features) and the activations of the largest pass (Korthikanti et al.'s per-layer count for backward passes, the
logits and their log-softmax for every pass).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mergeflow.architecture import Architecture
from mergeflow.errors import MergeflowError
from mergeflow.importance.base import get_estimator
from mergeflow.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mergeflow.importance.data import TaskData

FP32 = 4
MODELS = ("base", "expert", "merged")


class CostEstimateError(MergeflowError):
    """An importance entry whose cost cannot be estimated (no plan, no task data, an unbuildable architecture)."""


# ------------------------------------------------------------------------------------------------ what a plan is


@dataclass(frozen=True)
class Pass:
    """``count`` passes of one shape: ``model`` run on ``rows`` sequences padded to ``width`` tokens.

    ``layers``: decoder layers computed (None: all of them; fewer where blocks are skipped or one module runs);
    ``head``: whether the embedding and the LM head (with the log-softmax) run; ``backward``: a backward follows;
    ``recorded``: what the estimator records with ``run.count`` for each such pass (forward, backward) — not always
    one per pass: Fisher's and Sens-Merging's vmapped chunks count one, SLTA counts base forwards, not module passes.
    """

    label: str
    model: str
    rows: int
    width: int
    count: int = 1
    backward: bool = False
    layers: float | None = None
    head: bool = True
    recorded: tuple[int, int] = (1, 0)

    @property
    def tokens(self) -> int:
        return self.rows * self.width * self.count


@dataclass
class CostPlan:
    """An estimator's passes and what it holds in memory at once (component → bytes)."""

    estimator: str
    passes: list[Pass]
    memory: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def recorded(self) -> dict[str, int]:
        """The passes a run records (``Measurements.passes`` / the artifact's ``stats["passes"]``)."""
        return {"forward": sum(p.count * p.recorded[0] for p in self.passes),
                "backward": sum(p.count * p.recorded[1] for p in self.passes)}

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    def summary(self) -> dict[str, Any]:
        by_model: dict[str, dict[str, int]] = {}
        for p in self.passes:
            row = by_model.setdefault(p.model, {"forward": 0, "backward": 0, "tokens": 0})
            row["forward"] += p.count
            row["backward"] += p.count if p.backward else 0
            row["tokens"] += p.tokens
        return {"recorded": self.recorded(), "by_model": by_model,
                "tokens": sum(p.tokens for p in self.passes),
                "forward": sum(p.count for p in self.passes),
                "backward": sum(p.count for p in self.passes if p.backward)}


@dataclass(frozen=True)
class TaskShape:
    """One expert's task data as the plans see it: ``key`` identifies the examples (tasks with equal keys are the
    same data), ``lengths`` the token count of each example's full text (prompt, delimiter, answer), in order."""

    key: str
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class PlanInputs:
    params: Mapping[str, Any]
    tasks: tuple[TaskShape, ...]     # row i: expert i's data
    arch: Architecture
    device_type: str = "cpu"
    ood: bool = False

    @property
    def k(self) -> int:
        return len(self.tasks)

    def distinct(self) -> list[TaskShape]:
        """Each distinct task once, in order of first appearance."""
        seen: dict[str, TaskShape] = {}
        for t in self.tasks:
            seen.setdefault(t.key, t)
        return list(seen.values())

    def groups(self) -> list[tuple[TaskShape, list[int]]]:
        """Experts grouped by their task data, in order of first appearance."""
        out: dict[str, tuple[TaskShape, list[int]]] = {}
        for i, t in enumerate(self.tasks):
            out.setdefault(t.key, (t, []))[1].append(i)
        return list(out.values())


Plan = Callable[[PlanInputs], CostPlan]

COST_PLANS: Registry[Plan] = Registry("importance cost plan")


def declare_plan(estimator: str) -> Callable[[Plan], Plan]:
    """Decorator: ``fn`` declares the passes and memory of ``estimator`` (registered in the estimator's module)."""
    return COST_PLANS.register(estimator)


def plan_for(estimator: str, inputs: PlanInputs) -> CostPlan:
    """The declared plan of ``estimator`` for ``inputs`` (importing the estimator's module, which declares it)."""
    get_estimator(estimator)
    if estimator not in COST_PLANS:
        raise CostEstimateError(f"importance: {estimator} declares no cost plan")
    return COST_PLANS[estimator](inputs)


# ------------------------------------------------------------------------------------------------ plan helpers


def truncated(lengths: Sequence[int], max_length: int | None) -> list[int]:
    """Token lengths after ``encode(..., max_length=...)`` (the prompt's left side is cut)."""
    return [min(n, max_length) if max_length else n for n in lengths]


def chunks(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """``(rows, width)`` of each batch of ``scoring.batches``: consecutive rows, trimmed to their longest."""
    return [(len(lengths[s:s + batch_size]), max(lengths[s:s + batch_size]))
            for s in range(0, len(lengths), batch_size)]


def passes_over(label: str, model: str, shapes: Sequence[tuple[int, int]], *, times: int = 1,
                backward: bool = False, layers: float | None = None, head: bool = True,
                recorded: tuple[int, int] = (1, 0)) -> list[Pass]:
    """One pass per shape, ``times`` over (equal shapes merged)."""
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + times
    return [Pass(label, model, r, w, n, backward, layers, head, recorded) for (r, w), n in counts.items() if n]


def parameter_count(arch: Architecture) -> int:
    """Floating entries of the model (a tied LM head once: the checkpoint stores it once)."""
    return sum(math.prod(r.shape) for r in arch.tensors.values() if r.is_floating)


def linear_inputs(arch: Architecture) -> list[int]:
    """The input width of every linear layer whose weight is its own (RegMean's Grams: in × in each)."""
    out = []
    for role in arch.tensors.values():
        if len(role.shape) != 2 or role.is_bias or role.kind in ("embed", "pos_embed", "norm"):
            continue
        out.append(role.shape[0] if role.conv1d else role.shape[1])
    return out


def activation_bytes(arch: Architecture, rows: int, width: int, *, backward: bool, layers: float | None = None,
                     head: bool = True) -> int:
    """Activations of one pass (fp32). Backward: every computed layer's saved tensors, ``s·b·h·(34 + 5·a·s/h)``
    bytes at 16 bits (Korthikanti et al. 2022), doubled for fp32; forward: one layer's working set. Both: the
    logits and their log-softmax, fp32."""
    tokens = rows * width
    d, heads = arch.hidden_size, arch.num_heads
    per_layer = 2 * tokens * (34 * d + 5 * heads * width)
    n_layers = arch.num_layers if layers is None else layers
    body = int(per_layer * max(1.0, n_layers)) if backward else per_layer
    logits = 3 * tokens * arch.vocab_size * FP32 if head else 0
    return body + logits


def largest_activations(arch: Architecture, passes: Sequence[Pass]) -> int:
    return max((activation_bytes(arch, p.rows, p.width, backward=p.backward, layers=p.layers, head=p.head)
                for p in passes), default=0)


def model_bytes(arch: Architecture, n: float = 1) -> int:
    return int(n * parameter_count(arch) * FP32)


# ------------------------------------------------------------------------------------------------ task shapes


def task_shapes(tokenizer: PreTrainedTokenizerBase, tasks: Sequence[TaskData]) -> tuple[TaskShape, ...]:
    """Each task's token lengths, tokenised as the estimators tokenise (``scoring.encode``)."""
    from mergeflow.importance.scoring import encode

    memo: dict[str, TaskShape] = {}
    out = []
    for t in tasks:
        if t.sha256 not in memo:
            enc = encode(tokenizer, list(t.examples), answer_only=False)
            memo[t.sha256] = TaskShape(t.sha256, tuple(int(n) for n in enc.lengths.tolist()))
        out.append(memo[t.sha256])
    return tuple(out)


# ------------------------------------------------------------------------------------------------ measured costs


@dataclass
class LayerCosts:
    """Measured seconds of one decoder layer and of the rest of the model, per kind (``forward``: no grad,
    ``backward``: forward + backward), at some ``(rows, width)`` shapes; :meth:`seconds` interpolates in tokens."""

    device: str
    layer: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    rest: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    repeats: int = 0
    build_seconds: float = 0.0

    @staticmethod
    def _at(table: Mapping[tuple[int, int], float], tokens: int) -> float:
        points = sorted((r * w, t) for (r, w), t in table.items())
        if len(points) == 1:
            (x0, y0), = points
            return y0 * tokens / x0
        (x0, y0), (x1, y1) = points[0], points[-1]  # the smallest and the largest shape measured
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
        return max(0.0, y0 + slope * (tokens - x0))

    def seconds(self, p: Pass, num_layers: int) -> float:
        kind = "backward" if p.backward else "forward"
        tokens = p.rows * p.width
        layers = num_layers if p.layers is None else p.layers
        one = layers * self._at(self.layer[kind], tokens) + (self._at(self.rest[kind], tokens) if p.head else 0.0)
        return p.count * one

    def describe(self) -> dict[str, Any]:
        def rows(table: Mapping[str, Mapping[tuple[int, int], float]]) -> dict[str, dict[str, float]]:
            return {kind: {f"{r}x{w}": round(s, 6) for (r, w), s in sorted(t.items())} for kind, t in table.items()}

        return {"device": self.device, "layer_seconds": rows(self.layer), "rest_seconds": rows(self.rest),
                "repeats": self.repeats}


def _decoder_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The one decoder block of a model built with a single layer."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 1]
    preferred = [m for name, m in lists if name.split(".")[-1] in ("layers", "h", "blocks", "layer")]
    if preferred or lists:
        return (preferred or [m for _, m in lists])[0][0]
    raise CostEstimateError(f"cannot find the decoder layer of {type(model).__name__} to time it")


def one_layer_model(config: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The architecture of ``config`` with one decoder layer and random fp32 weights, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergeflow import transformers_io

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise CostEstimateError("config.json has no model_type: cannot build the architecture to time it")
    try:
        cfg = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise CostEstimateError(f"cannot build a {model_type} config to time it: {exc}") from None
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:1]
    with transformers_io.exclusive():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.to(device).eval()


def measure_layer_costs(config: Mapping[str, Any], shapes: Mapping[str, Sequence[tuple[int, int]]], *,
                        device: str | torch.device = "cpu", repeats: int = 3, budget_s: float = 20.0,
                        threads: int | None = None, max_tokens: int = 2048) -> LayerCosts:
    """Time one decoder layer and the rest of ``config``'s architecture at ``shapes`` (``{"forward": [...],
    "backward": [...]}``; at most the smallest and the largest of each kind are measured, the largest with fewer
    rows when it has more than ``max_tokens`` tokens: larger passes are extrapolated linearly in tokens, so that a
    7B check times seconds, not minutes), median of ``repeats`` after one warm-up; fewer repeats once a shape's runs
    pass ``budget_s`` seconds."""
    from mergeflow.devices import compute_threads

    device = torch.device(device)
    start = time.perf_counter()
    with compute_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = one_layer_model(config, device)
        out = LayerCosts(str(device), build_seconds=time.perf_counter() - start, repeats=repeats)
        layer = _decoder_layer(model)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        for kind, wanted in shapes.items():
            picked = sorted(set(wanted), key=lambda s: (s[0] * s[1], s))
            picked = [picked[0], picked[-1]] if len(picked) > 1 else picked
            picked = sorted({(max(1, min(r, max_tokens // w)), w) for r, w in picked})
            out.layer[kind], out.rest[kind] = {}, {}
            for rows, width in picked:
                layer_s, rest_s = _time_shape(model, layer, vocab, rows, width, backward=kind == "backward",
                                              device=device, repeats=repeats, budget_s=budget_s)
                out.layer[kind][(rows, width)] = layer_s
                out.rest[kind][(rows, width)] = rest_s
        del model
    return out


def _time_shape(model: torch.nn.Module, layer: torch.nn.Module, vocab: int, rows: int, width: int, *,
                backward: bool, device: torch.device, repeats: int, budget_s: float) -> tuple[float, float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    marks: dict[str, float] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a: marks.__setitem__("f0", now())),
               layer.register_forward_hook(lambda m, a, o: marks.__setitem__("f1", now()))]
    if backward:
        handles += [layer.register_full_backward_pre_hook(lambda m, g: marks.__setitem__("b0", now())),
                    layer.register_full_backward_hook(lambda m, gi, go: marks.__setitem__("b1", now()))]
    ids = torch.randint(0, vocab, (rows, width), device=device)
    samples: list[tuple[float, float]] = []
    spent = 0.0
    try:
        for i in range(repeats + 1):
            marks.clear()
            t0 = now()
            if backward:
                with torch.enable_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
                    torch.log_softmax(logits.float(), dim=-1)[..., 0].mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits
                    torch.log_softmax(logits.float(), dim=-1)
            total = now() - t0
            del logits
            in_layer = marks["f1"] - marks["f0"] + ((marks["b1"] - marks["b0"]) if backward else 0.0)
            spent += total
            if i > 0 or total > budget_s / 4:  # a slow shape needs no warm-up run: its first run counts
                samples.append((in_layer, max(0.0, total - in_layer)))
            if spent > budget_s and samples:
                break
    finally:
        for h in handles:
            h.remove()
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


# ------------------------------------------------------------------------------------------------ the estimate


@dataclass
class CostEstimate:
    estimator: str
    params: dict[str, Any]
    plan: CostPlan
    seconds: float
    device: str
    costs: LayerCosts

    def describe(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "params": self.params, "passes": self.plan.summary(),
                "seconds": round(self.seconds, 3), "device": self.device,
                "peak_memory_bytes": self.plan.peak_bytes, "memory_bytes": dict(self.plan.memory),
                "notes": list(self.plan.notes), "measured": self.costs.describe()}


def shapes_of(plan: CostPlan) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for p in plan.passes:
        out.setdefault("backward" if p.backward else "forward", []).append((p.rows, p.width))
    return out


def estimate(estimator: str, inputs: PlanInputs, config: Mapping[str, Any], *, device: str | torch.device = "cpu",
             costs: LayerCosts | None = None, threads: int | None = None, budget_s: float = 20.0) -> CostEstimate:
    """The plan of ``estimator`` for ``inputs`` and its time on ``device``, from one layer of ``config`` timed
    there (or the given ``costs``, measured at the plan's shapes)."""
    plan = plan_for(estimator, inputs)
    if costs is None:
        costs = measure_layer_costs(config, shapes_of(plan), device=device, threads=threads, budget_s=budget_s)
    seconds = sum(costs.seconds(p, inputs.arch.num_layers) for p in plan.passes)
    return CostEstimate(estimator, dict(inputs.params), plan, seconds, costs.device, costs)


def render(e: Mapping[str, Any]) -> list[str]:
    """Lines of ``mergeflow check`` for one entry's :meth:`CostEstimate.describe` (or ``{"error": ...}``)."""
    head = f"importance[{e['index']}] {e['estimator']}"
    if "error" in e:
        return [f"{head}: no estimate: {e['error']}"]
    given = e.get("given", e["params"])  # the recipe's own parameters (the JSON has every resolved one)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(given.items())) or "defaults"
    p = e["passes"]
    models = "; ".join(f"{m} {v['forward']} fwd/{v['backward']} bwd, {v['tokens']:,} tokens"
                       for m, v in p["by_model"].items())
    where = e["device"] if e["device"].startswith("cuda") else f"{e['device']} (no CUDA device here: a CPU estimate)"
    lines = [f"{head} ({shown})",
             f"    passes: {p['forward']} forward, {p['backward']} backward, {p['tokens']:,} tokens ({models})",
             f"    time ≈ {_duration(e['seconds'])} on {where}, from one layer timed at the passes' shapes",
             f"    peak memory ≈ {_bytes(e['peak_memory_bytes'])} ("
             + ", ".join(f"{k} {_bytes(v)}" for k, v in e["memory_bytes"].items() if v) + ")"]
    lines += [f"    note: {n}" for n in e["notes"]]
    return lines


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
