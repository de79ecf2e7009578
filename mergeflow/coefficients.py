"""The artifact between the importance stage and the merge: per (expert, partition) coefficients.

A data-aware estimator never merges anything itself. It writes a :class:`Coefficients` artifact that says, for every
expert and every partition of a level (docs/methods.md §1.3), the value of a merge-kernel parameter — a task-vector ``weight``
(Sens-Merging, SLTA, MI-TA, LM-Cocktail), a DARE ``drop_ratio`` (APL) — plus the raw scores it came from, for
auditing and heatmaps. The merge engine expands the values to per-tensor parameters (a scalar, or a vector along the
partition axis that broadcasts against the tensor) and hands them to the ordinary kernels.

Entry-level coefficients (a Fisher diagonal, RegMean's Gram matrices) are too big for a table: they are stored as one
safetensors file per expert, keyed by tensor name, and read one tensor at a time during the merge.

On disk an artifact is a folder: ``coefficients.json`` (metadata, partition ids, scalar tables) and
``values.safetensors`` (the tables and scores as tensors) and, for entry-level fields, ``entry/<field>/<k>.safetensors``.
Artifacts are content-addressed by :func:`coefficients_key`: the inputs' content hashes, the task data's hash, the
estimator's parameters and the code version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow.architecture import Architecture
from mergeflow.cache import CODE_VERSION, cache_key
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.partitions import Partitioner

META_FILE = "coefficients.json"
VALUES_FILE = "values.safetensors"
ENTRY_DIR = "entry"
FORMAT = 1

# The kernel parameter each coefficient field feeds, and how a field value becomes a parameter value.
FIELD_PARAMS = {
    "weight": "weight",          # task-vector (or model) weight
    "drop_ratio": "density",     # DARE drop ratio p̂ → density 1 − p̂
    "gram": "gram",              # RegMean: Gram matrix of a linear layer's inputs (entry level)
}
ENTRY = "entry"  # level name of per-entry fields


class CoefficientsError(MergeflowError):
    """A coefficients artifact that cannot be used for this merge (other experts, other architecture, bad values)."""


@dataclass
class CoefficientField:
    """One kernel parameter given per (expert, partition) — or per entry (``level == "entry"``)."""

    level: str                               # a partition level, or "entry"
    partitions: list[str] = field(default_factory=list)  # column ids (empty for entry level)
    values: torch.Tensor | None = None       # [K, P] float64 (None for entry level)
    default: list[float | None] | None = None  # per expert: value for tensors in no listed partition (None: recipe's)
    hidden_state_mode: str = "residual"
    gqa_policy: str | None = None


@dataclass
class Coefficients:
    """Coefficients of one estimator run for K experts, rows in the order of ``experts``."""

    estimator: str
    experts: list[dict[str, str]]            # [{"reference": ..., "content_hash": ...}] row order
    base: dict[str, str] | None
    fields: dict[str, CoefficientField]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)   # raw scores, e.g. "layer": [K, P]
    score_partitions: dict[str, list[str]] = field(default_factory=dict)  # column ids of each score table
    params: dict[str, Any] = field(default_factory=dict)             # the estimator's parameters
    data: dict[str, Any] = field(default_factory=dict)               # task data: names, splits, hashes
    stats: dict[str, Any] = field(default_factory=dict)              # timings, forward/backward pass counts
    key: str = ""                                                    # content address
    path: Path | None = None                                         # where it is stored (entry fields are read here)
    entry_tensors: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)  # unsaved

    # --------------------------------------------------------------------------------------------- validation

    def check(self) -> None:
        k = len(self.experts)
        for name, f in self.fields.items():
            if name not in FIELD_PARAMS:
                raise CoefficientsError(f"unknown coefficient field {name!r}; known: {', '.join(FIELD_PARAMS)}")
            if f.level == ENTRY:
                continue
            if f.values is None or tuple(f.values.shape) != (k, len(f.partitions)):
                raise CoefficientsError(f"field {name}: expected a {k}×{len(f.partitions)} table")
            if not torch.isfinite(f.values).all():
                raise CoefficientsError(f"field {name}: non-finite coefficients")
            if name == "drop_ratio" and ((f.values < 0) | (f.values >= 1)).any():
                raise CoefficientsError("field drop_ratio: every drop ratio must be in [0, 1)")
            if f.default is not None and len(f.default) != k:
                raise CoefficientsError(f"field {name}: one default per expert expected")

    # ------------------------------------------------------------------------------------------------ access

    def table(self, name: str) -> dict[str, dict[str, float]]:
        """A field as {expert reference: {partition: value}} (for logs, model cards and MLflow)."""
        f = self.fields[name]
        assert f.values is not None
        return {e["reference"]: {p: float(v) for p, v in zip(f.partitions, row.tolist())}
                for e, row in zip(self.experts, f.values)}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"estimator": self.estimator, "key": self.key, "params": self.params,
                               "fields": {}, "stats": self.stats}
        for name, f in self.fields.items():
            if f.level == ENTRY or f.values is None:
                out["fields"][name] = {"level": f.level}
                continue
            out["fields"][name] = {"level": f.level, "min": float(f.values.min()), "max": float(f.values.max()),
                                   "mean": float(f.values.mean())}
        return out

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> Path:
        """Write the artifact into ``folder`` (which should be empty: the cache gives a temporary sibling)."""
        self.check()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        meta_fields: dict[str, Any] = {}
        for name, f in self.fields.items():
            meta_fields[name] = {"level": f.level, "partitions": f.partitions, "default": f.default,
                                 "hidden_state_mode": f.hidden_state_mode, "gqa_policy": f.gqa_policy}
            if f.level == ENTRY:
                per_expert = self.entry_tensors.get(name)
                if per_expert is None:
                    raise CoefficientsError(f"entry field {name}: no tensors to save")
                sub = folder / ENTRY_DIR / name
                sub.mkdir(parents=True, exist_ok=True)
                for i, tensors_i in enumerate(per_expert):
                    save_file({n: t.contiguous() for n, t in tensors_i.items()}, str(sub / f"{i}.safetensors"))
            else:
                assert f.values is not None
                tensors[f"field.{name}"] = f.values.to(torch.float64).contiguous()
        for name, t in self.scores.items():
            tensors[f"score.{name}"] = t.detach().to(torch.float64).contiguous()
        save_file(tensors, str(folder / VALUES_FILE))
        meta = {"format": FORMAT, "code_version": CODE_VERSION, "estimator": self.estimator, "key": self.key,
                "experts": self.experts, "base": self.base, "fields": meta_fields,
                "score_partitions": self.score_partitions, "params": jsonable(self.params),
                "data": jsonable(self.data), "stats": jsonable(self.stats)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Coefficients:
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise CoefficientsError(f"{folder} is not a coefficients artifact (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CoefficientsError(f"{meta_path}: corrupt JSON ({exc})") from None
        if meta.get("format") != FORMAT:
            raise CoefficientsError(f"{folder}: coefficients format {meta.get('format')} is not {FORMAT}")
        tensors = load_file(str(folder / VALUES_FILE)) if (folder / VALUES_FILE).is_file() else {}
        fields = {}
        for name, fm in meta["fields"].items():
            fields[name] = CoefficientField(level=fm["level"], partitions=list(fm["partitions"]),
                                            values=tensors.get(f"field.{name}"), default=fm["default"],
                                            hidden_state_mode=fm.get("hidden_state_mode", "residual"),
                                            gqa_policy=fm.get("gqa_policy"))
        scores = {k.removeprefix("score."): v for k, v in tensors.items() if k.startswith("score.")}
        out = cls(estimator=meta["estimator"], experts=meta["experts"], base=meta["base"], fields=fields,
                  scores=scores, score_partitions=meta.get("score_partitions", {}), params=meta.get("params", {}),
                  data=meta.get("data", {}), stats=meta.get("stats", {}), key=meta.get("key", ""), path=folder)
        out.check()
        return out


def coefficients_key(estimator: str, *, base_hash: str | None, expert_hashes: Sequence[str],
                     data: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The content address of an estimator run: what it read (weights, data) and how (parameters, code)."""
    return cache_key("coefficients", estimator=estimator, base=base_hash, experts=list(expert_hashes),
                     data=dict(data), params=dict(params))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tensors as lists, paths as strings, non-finite floats as their repr."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------- consumption by the engine


class CoefficientSource:
    """Per-tensor kernel parameters from one or more artifacts, aligned with a merge plan's experts.

    ``expert_hashes`` are the content hashes of the plan's experts in recipe order; each artifact's rows are matched
    to them by content hash (so an artifact computed with the experts listed in another order still applies), and an
    artifact that lacks one of the experts is refused.
    """

    def __init__(self, artifacts: Sequence[Coefficients], arch: Architecture, expert_hashes: Sequence[str],
                 base_hash: str | None) -> None:
        self.arch = arch
        self.k = len(expert_hashes)
        self._fields: dict[str, tuple[Coefficients, CoefficientField, list[int], Partitioner | None]] = {}
        for art in artifacts:
            if art.base is not None and base_hash is not None and art.base["content_hash"] != base_hash:
                raise CoefficientsError(f"coefficients {art.key or art.path} were computed for another base model "
                                        f"({art.base['reference']})")
            rows = _match_rows(art, expert_hashes)
            for name, f in art.fields.items():
                param = FIELD_PARAMS[name]
                if param in {FIELD_PARAMS[n] for n in self._fields}:
                    raise RecipeError(f"coefficients: two artifacts both give {name!r}; give each field once")
                partitioner = None
                if f.level != ENTRY:
                    partitioner = Partitioner(arch, f.level, hidden_state_mode=f.hidden_state_mode,
                                              gqa_policy=f.gqa_policy)
                    known = set(partitioner.partition_ids())
                    unknown = [p for p in f.partitions if p not in known]
                    if unknown:
                        raise CoefficientsError(f"coefficients field {name}: partitions {unknown[:3]} do not exist "
                                                f"in this {arch.model_type} model at level {f.level}")
                elif art.path is None and name not in art.entry_tensors:
                    raise CoefficientsError(f"entry field {name} has neither a folder nor tensors")
                self._fields[name] = (art, f, rows, partitioner)

    @property
    def params(self) -> list[str]:
        return [FIELD_PARAMS[n] for n in self._fields]

    def tensor_params(self, name: str, shape: Sequence[int]) -> dict[str, list[Any]]:
        """{kernel param: one value per expert (recipe order)}; None where the recipe's own value stays."""
        out: dict[str, list[Any]] = {}
        for fname, (art, f, rows, partitioner) in self._fields.items():
            param = FIELD_PARAMS[fname]
            values: list[Any] = []
            for expert in range(self.k):
                row = rows[expert]
                if f.level == ENTRY:
                    values.append(_entry_value(art, fname, row, name))
                    continue
                assert partitioner is not None and f.values is not None
                part = partitioner.partition(name)
                table = dict(zip(f.partitions, f.values[row].tolist()))
                labels = part.unique_labels()
                default = f.default[row] if f.default is not None else None
                if not any(lab in table for lab in labels):
                    values.append(None if default is None else _as_param(fname, default))
                    continue
                if default is None and not all(lab in table for lab in labels):
                    raise CoefficientsError(f"coefficients field {fname}: tensor {name} is only partly covered "
                                            "and the field has no default")
                fill = math.nan if default is None else default
                expanded = part.expand(table, fill, shape)
                values.append(_as_param(fname, expanded if expanded.dim() else float(expanded)))
            out[param] = values
        return out


def _as_param(field_name: str, value: Any) -> Any:
    if field_name == "drop_ratio":
        return 1.0 - value
    return value


def _match_rows(art: Coefficients, expert_hashes: Sequence[str]) -> list[int]:
    rows_by_hash: dict[str, list[int]] = {}
    for i, e in enumerate(art.experts):
        rows_by_hash.setdefault(e["content_hash"], []).append(i)
    rows = []
    used: dict[str, int] = {}
    for h in expert_hashes:
        candidates = rows_by_hash.get(h, [])
        n = used.get(h, 0)
        if n >= len(candidates):
            raise CoefficientsError(f"coefficients {art.key or art.path} ({art.estimator}) were not computed for "
                                    f"expert {h}; recompute them for this recipe's experts")
        used[h] = n + 1
        rows.append(candidates[n])
    return rows


def _entry_value(art: Coefficients, fname: str, row: int, tensor: str) -> torch.Tensor | None:
    if fname in art.entry_tensors:
        return art.entry_tensors[fname][row].get(tensor)
    assert art.path is not None
    path = art.path / ENTRY_DIR / fname / f"{row}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        if tensor not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            return None
        return f.get_tensor(tensor).clone()  # a private copy: safetensors' tensors may share the file mapping


def plot_coefficients(coeffs: Coefficients, folder: str | Path, *, labels: list[str] | None = None) -> list[Path]:
    """One heatmap PNG per 2-D table of the artifact (its fields and raw scores, rows = experts, columns =
    partitions): where each expert's importance or weight sits across layers/modules. Tables wider than 64 columns
    (hidden-state level) are skipped: a picture of thousands of columns says nothing."""
    import matplotlib  # optional (the eval extra), and slow to import: only for the pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = labels or [e.get("task") or Path(e["reference"]).name for e in coeffs.experts]
    tables: list[tuple[str, torch.Tensor, list[str]]] = []
    for name, f in coeffs.fields.items():
        if f.values is not None and f.values.dim() == 2:
            tables.append((name, f.values, f.partitions))
    for name, t in coeffs.scores.items():
        if t.dim() == 2:
            tables.append((f"score_{name}", t, coeffs.score_partitions.get(name, [str(i) for i in range(t.shape[1])])))
    out = []
    for name, values, columns in tables:
        if values.shape[1] > 64 or values.shape[0] != len(rows):
            continue
        data = values.double().numpy()
        fig, ax = plt.subplots(figsize=(0.5 * len(columns) + 3, 0.45 * len(rows) + 1.6))
        im = ax.imshow(data, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows)
        fig.colorbar(im, ax=ax, label=name)
        ax.set_title(f"{coeffs.estimator}: {name}")
        fig.tight_layout()
        path = folder / f"{coeffs.estimator}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
