"""What each pipeline stage returns: small, typed, frozen manifests (paths, content hashes and a few numbers).

A manifest is what crosses a process or machine boundary between stages (a Prefect result, a deployment's return
value), so it holds no tensor and serialises to JSON. ``identity()`` is the part that says *what* was produced;
the fields listed in ``volatile`` say how a stage ran (its time, whether it was a cache hit, the device, who held an
alias at the time) and never enter a downstream cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    volatile: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict[str, Any]:
        """The manifest without its volatile fields: what a downstream stage's cache key is made of."""
        return self.model_dump(mode="json", exclude=set(self.volatile))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ResolvedModel(Manifest):
    """A checkpoint reference resolved to a checked local snapshot (a LoRA adapter: with the base it applies to)."""

    reference: str  # as the recipe wrote it
    path: str
    content_hash: str
    revision: str | None = None
    format: str = "safetensors"
    weight_files: tuple[str, ...] = ()
    adapter_base: ResolvedModel | None = None  # format "lora": the full checkpoint the adapter at ``path`` applies to

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        if self.adapter_base is None:  # keys of full checkpoints stay as they were before adapters
            out.pop("adapter_base", None)
        else:
            out["adapter_base"] = self.adapter_base.identity()
        return out

    @classmethod
    def of(cls, reference: str, snapshot: Any) -> ResolvedModel:
        """The manifest of a :class:`mergeflow.checkpoints.Snapshot` resolved from ``reference``."""
        base = snapshot.adapter_base
        return cls(reference=reference, path=str(snapshot.path), content_hash=snapshot.content_hash,
                   revision=snapshot.revision, format=snapshot.format, weight_files=tuple(snapshot.weight_files),
                   adapter_base=cls.of(base.reference, base) if base is not None else None)

    def snapshot(self) -> Any:
        """The :class:`mergeflow.checkpoints.Snapshot` this manifest describes (no file is read)."""
        from mergeflow.checkpoints import Snapshot

        return Snapshot(reference=self.reference, path=Path(self.path), content_hash=self.content_hash,
                        weight_files=tuple(self.weight_files), format=self.format, revision=self.revision,
                        adapter_base=self.adapter_base.snapshot() if self.adapter_base is not None else None)


class TaskVectors(Manifest):
    """An expert's task vector summarised: norms and the exact global trim threshold at each density."""

    volatile = frozenset({"seconds"})

    expert: str
    expert_hash: str
    base_hash: str
    densities: tuple[float, ...] = ()
    numel: int
    l2_norm: float
    thresholds: dict[str, float] = {}
    seconds: float = 0.0


class Measurement(Manifest):
    """One shard of an importance entry's model passes, measured into the content-addressed cache."""

    volatile = frozenset({"seconds", "reused", "passes", "device"})

    estimator: str
    part: str
    experts: tuple[int, ...]
    key: str
    experts_references: tuple[str, ...] = ()
    reused: bool = False
    seconds: float = 0.0
    passes: dict[str, int] = {}
    device: str = "cpu"


class CoefficientsRef(Manifest):
    """Where an importance entry's Coefficients artifact is (content-addressed by ``key``) and what it holds."""

    volatile = frozenset({"seconds", "stage_seconds", "passes", "device"})

    estimator: str
    key: str
    path: str
    params: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    passes: dict[str, Any] = {}
    seconds: float = 0.0  # the estimator's time when it ran (a cached artifact keeps it)
    stage_seconds: float = 0.0  # this stage's own time (a lookup when cached)
    device: str = "cpu"


class MergedModel(Manifest):
    """A merged model folder in the content-addressed cache (complete: renamed into place)."""

    volatile = frozenset({"seconds", "reused", "peak_rss_mb", "bytes", "tensors"})

    path: str
    content_hash: str
    recipe_hash: str
    key: str
    method: str
    name: str | None = None
    reused: bool = False
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    bytes: int = 0
    tensors: int = 0


class Evaluation(Manifest):
    """lm-eval accuracy (%) of one model on one split."""

    volatile = frozenset({"seconds", "reused", "device"})

    model: str  # the model's content hash
    split: str
    limit: int | None = None
    accuracy: dict[str, float]
    in_domain_avg: float
    avg: float
    in_domain: list[str]
    ood: list[str] = []
    path: str
    seconds: float = 0.0
    reused: bool = False
    device: str = "cpu"


class Registration(Manifest):
    """An MLflow run and the model version that holds the merge, with its selection metric."""

    volatile = frozenset({"champion", "previous_champion", "reused"})

    name: str
    version: str
    run_id: str
    model_uri: str
    source: str
    model_hash: str
    champion: bool = False
    previous_champion: str | None = None
    reused: bool = False
    model_id: str | None = None  # the MLflow logged model (None for versions registered as a plain folder)
    selection_metric: str
    selection_value: float
    higher_is_better: bool = True
    alias: str = "champion"


class Promotion(Manifest):
    """Where each alias the run's candidates competed for stands after the run."""

    name: str
    alias: str
    version: str | None = None
    moved: bool = False
    previous: str | None = None
    best_of_run: str | None = None
    summary: str
    models: list[dict[str, Any]] = []
