"""The accuracy matrix of a zoo: base, every expert and a set of merges, evaluated on every task.

The matrix is a plan of the stage graph (:mod:`mergeflow.graph`), like the pipeline's: the zoo's checkpoints are
resolved once, the data-aware methods' estimators run once per distinct entry, each merge is written into the
content-addressed cache and evaluated there, and every evaluation is cached by content (the model's weights, the
task data's hashes, the split, the limit and the code version), so a second run, or a run that adds one method,
evaluates only what is new.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from mergeflow import graph
from mergeflow.cache import Cache
from mergeflow.cli import user_errors
from mergeflow.recipe import EvaluationSpec
from mergeflow.transformers_io import load_causal_lm
from mergeflow.zoo.build import Zoo


@dataclass(frozen=True)
class MergeSpec:
    """One merge of all the zoo's experts, labelled as in the tables (``task_arithmetic@0.3``).

    ``importance`` lists data-aware estimator runs (``{"estimator", "parameters", "data"}``, as in a recipe): each
    expert is scored on its own zoo task, with the data drawn with the merge's seed.
    """

    label: str
    method: str
    parameters: dict[str, Any]
    per_model: dict[str, Any] | None = None
    importance: tuple[dict[str, Any], ...] = ()

    @property
    def data_aware(self) -> bool:
        return bool(self.importance)

    def recipe(self, zoo: Zoo, seed: int = 0, *, by_reference: bool = False) -> dict[str, Any]:
        """The recipe merging all of ``zoo``'s experts; ``by_reference`` names the zoo's models ``zoo:SIZE@SEED/...``
        instead of by folder, so the recipe (and its hash, and the registry's params) is the same on every machine."""
        ref = f"zoo:{zoo.size}@{zoo.seed}"

        def where(member: str) -> str:
            return f"{ref}/{member}" if by_reference else str(zoo.member(member))

        recipe: dict[str, Any] = {
            "merge_method": self.method,
            "base_model": where("base"),
            "models": [{"model": where(task), "parameters": dict(self.per_model or {})} for task in zoo.experts],
            "parameters": dict(self.parameters),
            "seed": seed,
            "name": f"zoo {self.label}",
        }
        if self.importance:
            for entry, task in zip(recipe["models"], zoo.experts):
                entry["task"] = task
            recipe["importance"] = [
                {**spec, "data": {**spec.get("data", {}), "seed": seed, "zoo": ref if by_reference else str(zoo.root)}}
                for spec in self.importance
            ]
        return recipe


# The data-free baselines, with the settings the papers and ZOO.md use as validation-free defaults.
DATA_FREE_MERGES: tuple[MergeSpec, ...] = (
    MergeSpec("weight_average", "linear", {}),
    MergeSpec("task_arithmetic@0.3", "task_arithmetic", {"lambda": 0.3}),
    MergeSpec("task_arithmetic@0.5", "task_arithmetic", {"lambda": 0.5}),
    MergeSpec("task_arithmetic@1.0", "task_arithmetic", {"lambda": 1.0}),
    MergeSpec("ties@0.2", "ties", {"lambda": 1.0}, {"density": 0.2}),
    MergeSpec("ties@0.2,λ0.5", "ties", {"lambda": 0.5}, {"density": 0.2}),
    MergeSpec("dare_linear@0.5", "dare_linear", {"lambda": 0.5}, {"density": 0.5}),
    MergeSpec("dare_ties@0.5", "dare_ties", {"lambda": 1.0}, {"density": 0.5}),
    MergeSpec("magnitude_prune@0.5", "magnitude_prune", {"lambda": 0.5}, {"density": 0.5}),
    MergeSpec("breadcrumbs@0.9", "breadcrumbs", {"lambda": 0.5}, {"density": 0.9, "gamma": 0.01}),
    MergeSpec("della@0.7", "della", {"lambda": 1.0}, {"density": 0.7, "epsilon": 0.15}),
    MergeSpec("consensus", "consensus", {"lambda": 0.5, "k": 2}, {"tall_lambda": 0.4}),
    MergeSpec("model_stock", "model_stock", {}),
    # the per-layer spectral methods at their papers' defaults (FusionBench's configs: λ = 1; WUDI has no λ)
    MergeSpec("tsv", "tsv", {"lambda": 1.0}),
    MergeSpec("iso_c", "iso_c", {"lambda": 1.0}),
    MergeSpec("iso_cts", "iso_cts", {"lambda": 1.0, "common_space_fraction": 0.8}),
    MergeSpec("wudi", "wudi", {}),
)


# The data-aware methods with the papers' defaults (docs/methods.md; no tuning on the zoo): each expert is scored on its
# own task's few-shot (APL, LM-Cocktail) or calibration examples (Sens, SLTA, Fisher, RegMean).
DATA_AWARE_MERGES: tuple[MergeSpec, ...] = (
    MergeSpec("lm_cocktail", "task_arithmetic", {}, importance=({"estimator": "cocktail"},)),
    # 100 calibration examples: every zoo size has that many (docs/methods.md §5.11–§5.12 use 256 for real models)
    MergeSpec("fisher", "linear", {}, importance=({"estimator": "fisher", "data": {"n": 100}},)),
    MergeSpec("regmean", "regmean", {}, importance=({"estimator": "regmean", "data": {"n": 100}},)),
    MergeSpec("ta+apl@0.9", "dare_linear", {"lambda": 0.5},
              importance=({"estimator": "apl", "parameters": {"level": "layer", "p": 0.9}},)),
    MergeSpec("mi-ta+apl@0.9", "dare_linear", {},
              importance=({"estimator": "apl", "parameters": {"level": "layer", "p": 0.9, "weights": "mi"}},)),
    MergeSpec("ta+sens", "task_arithmetic", {}, importance=({"estimator": "sens", "parameters": {"lambda": 0.5}},)),
    MergeSpec("ties+sens", "ties", {}, {"density": 0.3}, importance=({"estimator": "sens"},)),
    MergeSpec("slta(attn_mlp)", "task_arithmetic", {},
              importance=({"estimator": "slta", "parameters": {"level": "attn_mlp"}},)),
    # layer-wise AdaMerging on the calibration examples (its defaults: supervised objective, 200 Adam steps)
    MergeSpec("adamerging", "task_arithmetic", {}, importance=({"estimator": "adamerging", "data": {"n": 100}},)),
)


class Matrix:
    """Evaluates models of one zoo on all its tasks: its rows planned and run as one stage graph."""

    def __init__(
        self,
        zoo: Zoo,
        *,
        split: str = "test",
        limit: int | None = None,
        cache: Cache | None = None,
        progress: Callable[[str], None] | None = None,
        device: str = "cpu",
    ) -> None:
        self.zoo = zoo
        self.split = split
        self.limit = limit
        self.cache = cache or Cache()
        self.progress = progress or (lambda msg: None)
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._results: dict[graph.Node, Any] = {}  # node -> manifest, shared by the rows of this matrix

    def _load_base(self) -> tuple[Any, Any]:
        """The zoo's base model and tokenizer in memory (for callers that score a state dict themselves)."""
        if self._model is None:
            self._model = load_causal_lm(self.zoo.base)
            self._tokenizer = AutoTokenizer.from_pretrained(self.zoo.base)
        return self._model, self._tokenizer

    @property
    def evaluation(self) -> EvaluationSpec:
        """Every task of the zoo on this matrix's split and limit (the selection is the same evaluation)."""
        return EvaluationSpec(tasks=list(self.zoo.tasks), zoo=str(self.zoo.root), split=self.split,
                              limit=self.limit, selection={"split": self.split, "limit": self.limit})

    def plan(self, merges: Iterable[MergeSpec] = DATA_FREE_MERGES, seed: int = 0) -> tuple[graph.Plan,
                                                                                         dict[str, graph.Node]]:
        """The graph of the matrix: base and experts resolved and evaluated, each merge planned like a recipe of
        the pipeline (resolve, task vectors, importance, merge, evaluate; nothing registered). Returns the plan and
        its rows (label -> the evaluate node that gives the row)."""
        recipes = [(spec.label, {**spec.recipe(self.zoo, seed), "evaluation": self.evaluation.model_dump(
            mode="json")}) for spec in merges]
        members = {"base": str(self.zoo.base), **{f"expert:{t}": str(p) for t, p in self.zoo.experts.items()}}
        rows: dict[str, graph.Node] = {}
        plan = graph.plan(recipes, register=False) if recipes else graph.Plan()
        for label, ref in members.items():
            rows[label] = plan.add(graph.evaluate_node(plan.add(graph.ResolveNode(reference=ref)),  # type: ignore
                                                       self.evaluation))
        for label, target in plan.targets.items():
            rows[label] = target.reported
        return plan, rows

    def _scores(self, node: graph.Node) -> dict[str, float]:
        graph.execute([node], graph.RunContext(device=self.device), self._results)
        accuracy = self._results[node].accuracy
        return {task: accuracy[task] for task in self.zoo.tasks}

    def checkpoint(self, path: Path) -> dict[str, float]:
        """Scores of a model folder (base or expert)."""
        return self._scores(graph.evaluate_node(graph.ResolveNode(reference=str(path)), self.evaluation))

    def merge(self, spec: MergeSpec, seed: int = 0) -> dict[str, float]:
        """Scores of a merge of all experts (merged into the content-addressed cache when not there yet)."""
        _, rows = self.plan([spec], seed)
        return self._scores(rows[spec.label])

    def run(self, merges: Iterable[MergeSpec] = DATA_FREE_MERGES, seed: int = 0) -> dict[str, Any]:
        """The matrix as ``{"tasks": {...}, "models": {"base": {...}, "expert:TASK": {...}, LABEL: {...}}}``."""
        _, rows = self.plan(list(merges), seed)
        models: dict[str, dict[str, float]] = {}
        for label, node in rows.items():
            self.progress(label)
            models[label] = self._scores(node)
        return {
            "tasks": {"in_domain": list(self.zoo.in_domain), "ood": list(self.zoo.ood)},
            "models": models,
            "split": self.split,
            "zoo": {"size": self.zoo.size, "seed": self.zoo.seed},
        }


def experts_row(matrix: Mapping[str, Any]) -> dict[str, float]:
    """Each expert on its own task (the diagonal)."""
    return {task: matrix["models"][f"expert:{task}"][task] for task in matrix["tasks"]["in_domain"]}


def table_rows(matrix: Mapping[str, Any]) -> list[tuple[str, list[float | None]]]:
    """Rows of an APL-Table-1-shaped table: in-domain tasks, their average, then the OOD tasks."""
    ind, ood = matrix["tasks"]["in_domain"], matrix["tasks"]["ood"]
    rows: list[tuple[str, list[float | None]]] = []

    def row(label: str, scores: Mapping[str, float], with_ood: bool = True) -> None:
        values: list[float | None] = [scores[t] for t in ind]
        values.append(sum(scores[t] for t in ind) / len(ind))
        values += [scores[t] if with_ood else None for t in ood]
        rows.append((label, values))

    row("base", matrix["models"]["base"])
    row("experts (own task)", experts_row(matrix), with_ood=False)
    for label, scores in matrix["models"].items():
        if label != "base" and not label.startswith("expert:"):
            row(label, scores)
    return rows


def format_table(matrix: Mapping[str, Any]) -> str:
    ind, ood = matrix["tasks"]["in_domain"], matrix["tasks"]["ood"]
    header = ["method", *ind, "avg", *(f"{t}*" for t in ood)]
    rows = table_rows(matrix)
    width = max(len(h) for h in header[1:]) + 1
    first = max(len("method"), *(len(label) for label, _ in rows)) + 2
    lines = [header[0].ljust(first) + "".join(h.rjust(width) for h in header[1:])]
    lines.append("-" * len(lines[0]))
    for label, values in rows:
        cells = "".join(("" if v is None else f"{v:.1f}").rjust(width) for v in values)
        lines.append(label.ljust(first) + cells)
    lines.append(f"accuracy (%) on the {matrix.get('split', 'test')} split; * = out-of-domain task")
    return "\n".join(lines)


def save_png(matrix: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """A heatmap picture of the same table."""
    import matplotlib  # the optional [eval] extra, and seconds of import time nothing else here needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ind, ood = matrix["tasks"]["in_domain"], matrix["tasks"]["ood"]
    rows = table_rows(matrix)
    columns = [*ind, "avg", *(f"{t}*" for t in ood)]
    data = np.array([[np.nan if v is None else v for v in values] for _, values in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 3, 0.42 * len(rows) + 1.6))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if data[i, j] < 60 else "black",
                )
    ax.axvline(len(ind) + 0.5, color="white", lw=2)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(
        title
        or f"zoo ({matrix['zoo']['size']}, seed {matrix['zoo']['seed']}): accuracy on the "
        f"{matrix.get('split', 'test')} split"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command("matrix")
@click.argument("zoo_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the matrix here.")
@click.option(
    "--png",
    type=click.Path(path_type=Path),
    default=None,
    help="Heatmap file [default: beside --json, else in the zoo folder].",
)
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="Score only the first N examples of each task.")
@click.option("--no-progress", is_flag=True)
def matrix_command(
    zoo_dir: Path, json_out: Path | None, png: Path | None, split: str, limit: int | None, no_progress: bool
) -> None:
    """Evaluate base, every expert and the data-free merges of ZOO_DIR on every task; print the matrix."""
    user_errors(run_matrix)(zoo_dir, json_out, png, split, limit, not no_progress)


def run_matrix(
    zoo_dir: Path,
    json_out: Path | None = None,
    png: Path | None = None,
    split: str = "test",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    zoo = Zoo.load(zoo_dir)
    bar = tqdm(total=1 + len(zoo.in_domain) + len(DATA_FREE_MERGES), unit="model", disable=not progress)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    matrix = Matrix(zoo, split=split, limit=limit, progress=step).run()
    bar.close()
    click.echo(format_table(matrix))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(matrix, indent=2) + "\n")
    picture = save_png(matrix, png or (json_out.with_suffix(".png") if json_out else zoo.root / f"matrix-{split}.png"))
    click.echo(f"heatmap: {picture}")
    return matrix
