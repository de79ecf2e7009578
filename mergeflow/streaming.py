"""The streaming merge of resolved inputs: for each output tensor, gather → run the method's kernel → write, with
prefetch.

It takes what the pipeline's earlier stages produced — the base's and experts' snapshots (:class:`MergeInputs`) and
the Coefficients of data-aware recipes — and never resolves a reference or computes importance itself (that is the
stage graph's job, :mod:`mergeflow.graph`; :mod:`mergeflow.engine` is the recipe-in, model-out entry point over
both). Peak memory is about (K + 1) × the largest tensor in the compute dtype plus the prefetched next tensor set; no
model is ever held whole. Planning (headers, compatibility, parameters, output path) happens before any tensor is
read, so every recipe or input problem surfaces in well under a second with nothing written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from mergeflow import __version__
from mergeflow.architecture import Architecture
from mergeflow.checkpoints import Snapshot, contained_file, count_non_finite, open_checkpoint, read_model_config
from mergeflow.coefficients import Coefficients, CoefficientSource
from mergeflow.compatibility import CompatibilityReport, compare, summarize
from mergeflow.devices import compute_threads, pick_device
from mergeflow.errors import (
    IncompatibleModelsError,
    NonFiniteResultError,
    RecipeError,
    StorageError,
    storage_error,
)
from mergeflow.methods.base import KernelInput, MergeMethod
from mergeflow.recipe import Recipe
from mergeflow.task_vectors import task_vector_manifest
from mergeflow.tensors import (
    ShardedWriter,
    TensorReader,
    TensorSpec,
    atomic_directory,
    check_output_path,
    dtype_from_name,
    dtype_name,
    ensure_open_files,
    parse_size,
    plan_shards,
)
from mergeflow.tokenizer_io import TOKENIZER_FILES, has_tokenizer, load_tokenizer
from mergeflow.vocabulary import (
    VocabInput,
    VocabularyPlan,
    chat_template_of,
    describe_differences,
    input_index,
    read_vocab_size,
    recipe_vocabulary,
    vocabulary_tensors,
)

DEFAULT_SHARD_SIZE = "1GB"
_COPIED_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"  # cpu | cuda | auto
    shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    progress: bool = True
    # CPU threads for the arithmetic; default: all cores but one, which the reader and writer threads use
    # (oversubscribed OpenMP threads spin at barriers and run many times slower than one thread), or every core
    # for the methods whose per-tensor arithmetic dominates (``MergeMethod.compute_bound``: the SVD-based ones)
    threads: int | None = None


@dataclass(frozen=True)
class MergeInputs:
    """The resolved checkpoints of a recipe: its base (None without one) and its experts in the recipe's order, plus
    the tokenizer's source when the recipe names one that is not among them."""

    base: Snapshot | None
    experts: tuple[Snapshot, ...]
    tokenizer: Snapshot | None = None

    def check(self, recipe: Recipe) -> None:
        if (recipe.base_model is None) != (self.base is None) or len(self.experts) != len(recipe.experts):
            raise RecipeError(f"merge inputs: the recipe has {'a' if recipe.base_model else 'no'} base and "
                              f"{len(recipe.experts)} models, but {'a' if self.base else 'no'} base and "
                              f"{len(self.experts)} snapshots were given")


@dataclass
class Input:
    role: str  # "base" or "model[i]"
    snapshot: Snapshot
    reader: TensorReader  # a LoRA adapter expert: its base's tensors plus scale·B·A, computed when read
    arch: Architecture
    rng_id: str  # stable identity for random draws: content hash (+ occurrence when repeated)


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    base: Input | None
    experts: list[Input]
    reference: Input  # whose tensor layout, config and tokenizer the output takes
    specs: list[TensorSpec]  # output tensors, in the reference's order
    params: dict[str, tuple[dict[str, list[Any]], dict[str, Any]]]
    compute_dtype: torch.dtype | None  # None: per tensor (fp32, or fp64 inputs stay fp64)
    device: torch.device
    report: CompatibilityReport
    thresholds: list[float] | None = None
    coefficients: list[Coefficients] = field(default_factory=list)  # data-aware artifacts the kernels consume
    coefficient_source: CoefficientSource | None = None
    tokenizer: Snapshot | None = None  # the recipe's tokenizer_source when it is not one of the inputs
    # tokenizer_source / tokenizer: the output vocabulary and each input's rows in it (None: rows by index)
    vocabulary: VocabularyPlan | None = None
    vocab_tensors: frozenset[str] = frozenset()  # the reference's embedding / head tensors (vocabulary on dim 0)
    out_tokenizer: Any = None  # a tokenizer to save beside the weights (a union, added tokens, a chat template)

    @property
    def canonical_order(self) -> list[int]:
        if self.recipe.mergekit_compat:
            return list(range(len(self.experts)))
        return sorted(range(len(self.experts)), key=lambda i: self.experts[i].rng_id)

    @property
    def inputs(self) -> list[Input]:
        return ([self.base] if self.base else []) + self.experts

    def out_shape(self, name: str) -> tuple[int, ...]:
        if self.vocabulary is not None and name in self.vocab_tensors:
            return (self.vocabulary.rows, *self.reference.reader.specs[name].shape[1:])
        return tuple(self.reference.reader.specs[name].shape)

    def realigns(self, name: str) -> bool:
        """Whether tensor ``name``'s rows are re-indexed to the output vocabulary before the merge."""
        return self.vocabulary is not None and not self.vocabulary.identity and name in self.vocab_tensors

    def aligned(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` (every input's ``name``, base first, in one dtype) re-indexed to the output vocabulary."""
        assert self.vocabulary is not None
        return self.vocabulary.align(tensors)

    def input_hashes(self) -> dict[str, str]:
        return {i.snapshot.reference: i.snapshot.content_hash for i in self.inputs}

    def close(self) -> None:
        for i in self.inputs:
            i.reader.close()


@dataclass
class MergeResult:
    path: Path | None
    recipe_hash: str
    input_hashes: dict[str, str]
    n_tensors: int
    bytes_written: int
    seconds: float
    thresholds: list[float] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def layer_fraction(arch: Architecture, name: str) -> float:
    """mergekit's gradient position: layer i of L → i/(L−1); tensors outside blocks → 0."""
    role = arch.tensors.get(name)
    if role is None or role.layer_index is None:
        return 0.0
    return role.layer_index / (arch.num_layers - 1) if arch.num_layers > 1 else 1.0


def _open(snap: Snapshot, recipe: Recipe) -> tuple[Snapshot, TensorReader, Architecture]:
    config = read_model_config(snap.model_folder)
    reader = open_checkpoint(snap, allow_pickle=recipe.allow_pickle)
    arch = Architecture.infer(config, {n: s.shape for n, s in reader.specs.items()})
    return snap, reader, arch


def _adapter_base(snapshot: Snapshot) -> tuple[str, str] | None:
    base = snapshot.adapter_base
    return (base.reference, base.content_hash) if base is not None else None


def plan_merge(recipe: Recipe, inputs: MergeInputs, *, out: Path | None = None,
               options: MergeOptions = MergeOptions(), strict: bool = True,
               coefficients: list[Coefficients] | None = None, require_coefficients: bool = True) -> MergePlan:
    """Inspect and validate everything a merge of ``inputs`` needs, without reading a single tensor's data.

    A data-aware recipe (``importance`` or ``coefficients``) needs its Coefficients, in the recipe's order: the
    ones its ``coefficients`` files hold, then one per ``importance`` entry. ``require_coefficients=False`` checks
    such a recipe without them (a plan to inspect, not to merge).
    """
    inputs.check(recipe)
    opened: list[Input] = []
    try:
        return _plan(recipe, inputs, out, options, strict, opened, coefficients, require_coefficients)
    except BaseException:
        for i in opened:  # a refused plan must not leave file descriptors open in a long-lived worker
            i.reader.close()
        raise


def _plan(recipe: Recipe, inputs: MergeInputs, out: Path | None, options: MergeOptions, strict: bool,
          opened: list[Input], coefficients: list[Coefficients] | None, require_coefficients: bool) -> MergePlan:
    method = recipe.method
    device = pick_device(options.device)
    snapshots = ([inputs.base] if inputs.base is not None else []) + list(inputs.experts)
    ensure_open_files(sum(s.n_files for s in snapshots), f"the {len(snapshots)} models of the merge")
    base: Input | None = None
    if inputs.base is not None:
        snap, reader, arch = _open(inputs.base, recipe)
        base = Input("base", snap, reader, arch, snap.content_hash)
        opened.append(base)
    experts: list[Input] = []
    seen: dict[str, int] = {}
    for i, expert in enumerate(inputs.experts):
        snap, reader, arch = _open(expert, recipe)
        n = seen.get(snap.content_hash, 0)
        seen[snap.content_hash] = n + 1
        experts.append(Input(f"model[{i}]", snap, reader, arch, f"{snap.content_hash}#{n}"))
        opened.append(experts[-1])
    reference = base if base is not None else experts[0]
    summaries = {id(i): summarize(i.role, i.snapshot.reference, i.snapshot.content_hash, i.arch, i.reader,
                                  adapter_base=_adapter_base(i.snapshot)) for i in [reference, *experts]}
    aligned = recipe.vocabulary_source is not None
    problems, warnings = compare(
        (summaries[id(reference)], reference.arch, reference.reader),
        [(summaries[id(e)], e.arch, e.reader) for e in experts if e is not reference],
        vocab_policy="tokenizer" if aligned else recipe.vocab_policy,
    )
    if recipe.vocab_policy == "base":
        warnings.append("vocab_policy: base is deprecated: it merges embedding rows by index; tokenizer_source: "
                        "base keeps the base's vocabulary and aligns every model's rows by token")
    report = CompatibilityReport([summaries[id(reference)]] + [summaries[id(e)] for e in experts
                                                                 if e is not reference], problems, warnings)
    all_inputs = ([base] if base is not None else []) + experts
    vocab_names = frozenset(vocabulary_tensors(reference.arch))
    vocabulary = None
    if not problems:
        vocab_inputs = [_vocab_input(i, vocab_names) for i in all_inputs]
        if aligned:
            vocabulary = recipe_vocabulary(recipe, all_inputs, vocab_inputs, base is not None, inputs.tokenizer)
            report.vocabulary = list(vocabulary.summary)
        else:
            differences = describe_differences(vocab_inputs, trust_remote_code=recipe.trust_remote_code)
            if differences:
                report.vocabulary = differences
                warnings.append("the models' vocabularies differ (see vocabulary) but their rows are merged by "
                                "index; set tokenizer_source: base, union or a model to align them by token")
    if strict and problems:
        raise IncompatibleModelsError("; ".join(problems))

    out_dtype = dtype_from_name(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    compute_dtype = None
    if recipe.mergekit_compat and recipe.dtype:
        compute_dtype = dtype_from_name(recipe.dtype)
    specs = []
    params = {}
    for name, spec in reference.reader.specs.items():
        floating = spec.dtype.is_floating_point
        shape = spec.shape
        if vocabulary is not None and name in vocab_names:
            shape = (vocabulary.rows, *spec.shape[1:])
        specs.append(TensorSpec(name, shape, out_dtype if (floating and out_dtype) else spec.dtype))
        if floating:
            per_model, shared = recipe.tensor_params(name, layer_fraction(reference.arch, name))
            _check_tensor_params(method, name, per_model, shared, recipe.mergekit_compat)
            params[name] = (per_model, shared)
    report.estimate = _estimate(method, reference, experts, specs, compute_dtype, recipe.mergekit_compat,
                                frozenset(vocab_names) if vocabulary is not None and not vocabulary.identity
                                else frozenset())
    if out is not None:
        check_output_path(out, [p for i in [*([base] if base else []), *experts]
                                for p in dict.fromkeys([i.snapshot.path, i.snapshot.model_folder])],
                          overwrite=options.overwrite)
    plan = MergePlan(recipe, method, base, experts, reference, specs, params, compute_dtype, device, report,
                     tokenizer=inputs.tokenizer, vocabulary=vocabulary, vocab_tensors=vocab_names)
    if recipe.chat_template is not None and not problems:
        plan.out_tokenizer = _with_chat_template(plan)
    elif vocabulary is not None and vocabulary.copy_from is None:
        plan.out_tokenizer = vocabulary.tokenizer
    if out is not None and not problems:
        _support_files(plan)  # a config or tokenizer file linked outside its checkpoint: refused before any work
    if problems:  # only reachable with strict=False (a report for `mergeflow check`): read no tensor data
        return plan
    expected = len(recipe.coefficients) + len(recipe.importance)
    if expected and coefficients is None and not require_coefficients:
        return plan  # checked, not ready to merge: the caller computes the Coefficients next
    if expected and len(coefficients or ()) != expected:
        raise RecipeError(f"importance: the recipe needs {expected} Coefficients artifacts (its coefficients files, "
                          f"then one per importance entry) but the merge was given {len(coefficients or ())}; "
                          "the importance stage computes them (mergeflow.graph)")
    if coefficients:
        _attach_coefficients(plan, coefficients)
    if not recipe.mergekit_compat and any(method.needs_global_threshold(sh) for _, sh in params.values()):
        plan.thresholds = _global_thresholds(plan)
    return plan


def _vocab_input(i: Input, vocab_names: frozenset[str]) -> VocabInput:
    rows = next((i.reader.specs[n].shape[0] for n in sorted(vocab_names) if n in i.reader.specs), 0)
    path = i.snapshot.model_folder  # a LoRA adapter reads its base's tokenizer and config
    return VocabInput(i.role, i.snapshot.reference, path if has_tokenizer(path) else None,
                      read_vocab_size(path, rows), rows)


def _with_chat_template(plan: MergePlan) -> Any:
    """The output tokenizer with the recipe's chat_template (its Jinja text, or ``auto``: the template most inputs
    share, the first of them on a tie)."""
    recipe = plan.recipe
    if plan.vocabulary is not None:
        tok = plan.vocabulary.tokenizer
    else:
        folder = _tokenizer_folder(plan)
        tok = load_tokenizer(folder, trust_remote_code=recipe.trust_remote_code)
    template = recipe.chat_template
    if template == "auto":
        folders = [i.snapshot.model_folder for i in plan.inputs if has_tokenizer(i.snapshot.model_folder)]
        template = chat_template_of(folders, trust_remote_code=recipe.trust_remote_code)
    if template is not None:
        tok.chat_template = template
    return tok


def _attach_coefficients(plan: MergePlan, coefficients: list[Coefficients]) -> None:
    method = plan.method
    if plan.recipe.mergekit_compat:
        raise RecipeError("coefficients: data-aware coefficients have no mergekit equivalent (mergekit_compat)")
    source = CoefficientSource(coefficients, plan.reference.arch, [e.snapshot.content_hash for e in plan.experts],
                               plan.base.snapshot.content_hash if plan.base else None)
    for param in source.params:
        if param not in method.partition_params:
            accepts = ", ".join(method.partition_params) or "none"
            raise RecipeError(f"coefficients: {method.name} takes no per-partition {param!r} (it accepts: {accepts}); "
                              f"use a method that does, e.g. dare_linear for drop ratios")
    plan.coefficients = list(coefficients)
    plan.coefficient_source = source


def _check_tensor_params(method: MergeMethod, name: str, per_model: dict[str, list[Any]],
                         shared: dict[str, Any], compat: bool) -> None:
    if (method.normalizes_by_weight_sum and shared.get("normalize") is True
            and not (compat and method.compat_guards_zero_weight_sum)
            and abs(sum(float(w) for w in per_model["weight"])) < 1e-8):
        raise RecipeError(f"parameters.weight: the weights of tensor {name} sum to zero but {method.name} "
                          "normalises by their sum")
    for pname, values in per_model.items():
        spec = method.param(pname)
        for i, value in enumerate(values):
            if spec is not None and value is not None:
                spec.check(value, f"models[{i}].parameters.{pname} (tensor {name})")


# outputs the writer may still hold while the next tensor is merged: the one being written and two queued (merge())
WRITE_QUEUE = 3


def _estimate(method: MergeMethod, reference: Input, experts: list[Input], specs: list[TensorSpec],
              compute_dtype: torch.dtype | None, compat: bool, realigned: frozenset[str] = frozenset()
              ) -> dict[str, int]:
    """Peak memory of ``merge()`` on the CPU, tensor by tensor in the order the engine merges them: this process's
    memory now (interpreter, torch, mergeflow: a merge process holds the same) plus, at the worst tensor, the raw
    inputs read for it and for the next one (the reader prefetches), their copies in the compute dtype where the
    kernel needs them, what the kernel allocates (``MergeMethod.kernel_bytes``, output included) and the outputs
    the writer may still hold."""
    inputs = [reference, *[e for e in experts if e is not reference]]
    k = len(experts)

    raws, steps, outs = [], [], []
    for s in specs:
        held = [(i.reader.specs[s.name].dtype, i.reader.specs[s.name].nbytes) for i in inputs
                if s.name in i.reader.specs]
        raw = sum(n for _, n in held)
        raws.append(raw)
        outs.append(s.nbytes)
        if not s.dtype.is_floating_point:
            steps.append(raw)  # copied as read
            continue
        dtype = _work_dtype(compute_dtype, compat, [d for d, _ in held])
        item = dtype.itemsize
        streams = method.streams_raw_inputs and not compat
        converted = [] if streams else [n for d, n in held if d != dtype]
        copies = sum(n // d.itemsize * item for d, n in held if d != dtype and not streams)
        if s.name in realigned:  # every input re-indexed by token in the compute dtype
            copies += len(inputs) * s.numel * item
        kernel = method.kernel_bytes(tuple(s.shape), k, compat, item, out_item=s.dtype.itemsize)
        # while converting: the raw inputs and their copies; then the raw buffers that were copied are dropped
        steps.append(max(raw + copies, raw - sum(converted) + copies + kernel))
    worst = 0
    for i in range(len(specs)):
        queued = sum(outs[max(0, i - WRITE_QUEUE):i])
        following = raws[i + 1] if i + 1 < len(specs) else 0
        worst = max(worst, steps[i] + following + queued)
    process = psutil.Process().memory_info().rss
    largest = max((s.numel for s in specs), default=0)
    estimate = {"peak_bytes": int(process + worst), "process_bytes": int(process), "merge_bytes": int(worst),
                "disk_bytes": sum(s.nbytes for s in specs), "largest_tensor_numel": largest}
    # the method's own working memory (SVD factors, optimiser state) on the tensor that needs the most of it, as
    # part of the above, said apart because at 7B it is what decides whether a merge fits
    item = (compute_dtype.itemsize if compute_dtype else 4)
    need, shape = max(((method.workspace_elements(tuple(s.shape), k), tuple(s.shape)) for s in specs
                       if s.dtype.is_floating_point), default=(0, ()))
    if need > 0:
        estimate.update({"workspace_bytes": need * item, "workspace_rows": shape[0], "workspace_cols": shape[1]})
    return estimate


def _global_thresholds(plan: MergePlan) -> list[float]:
    """Per-expert exact |Δ| thresholds over the whole task vector (global TIES trim), cached by content."""
    thresholds = []
    for i, expert in enumerate(plan.experts):
        densities = {plan.params[n][0]["density"][i] for n in plan.params}
        if len(densities) != 1:
            raise RecipeError(f"models[{i}].parameters.density: trim_scope global needs one density per model; "
                              "use trim_scope: tensor for per-tensor densities")
        density = float(next(iter(densities)))
        assert plan.base is not None
        rows = None
        if plan.vocabulary is not None and not plan.vocabulary.identity:
            # the expert's Δ over the output vocabulary: its rows and the base's, both re-indexed by token
            def rows(name: str, k: int = i) -> tuple[torch.Tensor, torch.Tensor] | None:
                if name not in plan.vocab_tensors:
                    return None
                aligned = plan.aligned(name, [x.reader.get(name).float() for x in plan.inputs])
                return aligned[0], aligned[k + 1]
        manifest = task_vector_manifest(plan.base, expert, densities=(density,), rows=rows,
                                        rows_key=plan.vocabulary.digest() if rows is not None else None)
        thresholds.append(manifest.thresholds[repr(density)])
    return thresholds


# ------------------------------------------------------------------------------------------------ the merge loop


def _rng_seed(seed: int, tensor: str, model_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{tensor}\x00{model_id}".encode()).digest()
    return struct.unpack("<q", digest[:8])[0] & ((1 << 63) - 1)


def _fit_vocab(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """vocab_policy base: rows the base has; missing rows take the base's values (a zero task vector)."""
    if tensor.shape == like.shape:
        return tensor
    out = like.clone()
    rows = min(tensor.shape[0], like.shape[0])
    out[:rows] = tensor[:rows].to(like.dtype)
    return out


def _load(plan: MergePlan, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, list[Any]]]:
    # NaN/Inf were ruled out when the checkpoints were resolved (a scan memoised by inode, size, mtime and ctime)
    base = plan.base.reader.get(name) if plan.base else None
    models = [e.reader.get(name) for e in plan.experts]
    coeffs: dict[str, list[Any]] = {}
    if plan.coefficient_source is not None:
        shape = plan.out_shape(name)  # a realigned vocabulary tensor has the output vocabulary's rows
        coeffs = plan.coefficient_source.tensor_params(name, shape)
        if plan.realigns(name):
            coeffs = {k: [_realign_entry(plan, i, name, v) for i, v in enumerate(values)]
                      for k, values in coeffs.items()}
    return base, models, coeffs


def _realign_entry(plan: MergePlan, expert: int, name: str, value: Any) -> Any:
    """An estimator's per-entry value of expert ``expert`` over its own rows of a vocabulary tensor (a Fisher
    diagonal), re-indexed like the weights; a token the expert lacks (and the padding) gets 0: no evidence."""
    rows = plan.experts[expert].reader.specs[name].shape
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(rows):
        return value
    assert plan.vocabulary is not None
    src = plan.vocabulary.sources[expert + (1 if plan.base is not None else 0)]
    out = value.new_zeros((plan.vocabulary.rows, *value.shape[1:]))
    own = src >= 0
    out[: plan.vocabulary.n_tokens][own] = value[src[own]]
    return out


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _promotable(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for type promotion: torch refuses to promote the float8 types, which compute in float32."""
    return torch.float32 if _is_float8(dtype) else dtype


def _work_dtype(fixed: torch.dtype | None, compat: bool, stored: list[torch.dtype]) -> torch.dtype:
    """The dtype a tensor is merged in, from its inputs' stored dtypes (the reference's first): the recipe's compute
    dtype if it sets one; in compat mode the stored dtypes promoted as torch (and mergekit) promote them (float8 as
    float32: torch has no promotion for it); otherwise float32, float64 for float64 inputs."""
    if fixed is not None:
        return fixed
    if not compat:
        return torch.float64 if stored and stored[0] == torch.float64 else torch.float32
    dtype = _promotable(stored[0])
    for d in stored[1:]:
        dtype = torch.promote_types(dtype, _promotable(d))
    return dtype


def _to_compute(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, raw: bool) -> torch.Tensor:
    """An input on ``device``: in ``dtype``, or as stored for a kernel that streams raw inputs (float8 excepted)."""
    if raw and not _is_float8(tensor.dtype):
        return tensor.to(device)
    return tensor.to(device, dtype)


def iter_merged(plan: MergePlan, progress: Any | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor in the output dtype, on CPU)`` for every output tensor, streaming."""
    recipe, method = plan.recipe, plan.method
    names = [s.name for s in plan.specs]
    out_dtypes = {s.name: s.dtype for s in plan.specs}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-read")
    try:
        pending: Future | None = pool.submit(_load, plan, names[0]) if names else None
        for index, name in enumerate(names):
            assert pending is not None
            base_raw, models_raw, coeff_params = pending.result()
            pending = pool.submit(_load, plan, names[index + 1]) if index + 1 < len(names) else None
            reference_raw = base_raw if plan.base is not None else models_raw[0]
            if not reference_raw.is_floating_point():
                yield name, reference_raw  # integer / bool buffers are copied, never merged
                continue
            dtype = _work_dtype(plan.compute_dtype, recipe.mergekit_compat,
                                [reference_raw.dtype, *(t.dtype for t in models_raw)])
            # kernels that stream convert block by block; the others get whole tensors in the compute dtype. float8
            # inputs have no type promotion in torch, so they are upcast to the compute dtype even for streaming
            # kernels (they are a quarter of fp32's size: the copy is small)
            raw = method.streams_raw_inputs and not recipe.mergekit_compat
            base = _to_compute(base_raw, plan.device, dtype, raw) if base_raw is not None else None
            models = [_to_compute(t, plan.device, dtype, raw) for t in models_raw]
            # the raw buffers that were converted are not needed any more (the others are the inputs themselves)
            del base_raw, models_raw, reference_raw
            if plan.realigns(name):  # every input's rows re-indexed by token, in the compute dtype
                aligned = plan.aligned(name, [t.to(dtype) for t in ([base] if base is not None else []) + models])
                base, models = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
            if recipe.vocab_policy == "base" and base is not None:
                models = [_fit_vocab(t, base) for t in models]
            per_model, shared = plan.params[name]
            for pname, values in coeff_params.items():  # data-aware values replace the recipe's where given
                current = per_model.get(pname, [None] * len(values))
                per_model = {**per_model, pname: [c if v is None else v for v, c in zip(values, current)]}
            # Paper mode combines the experts in a canonical order (by content), so listing them differently gives
            # a bit-identical model; compat mode keeps the recipe order, as mergekit sums in config order.
            order = plan.canonical_order
            models = [models[i] for i in order]
            per_model = {k: [v[i] for i in order] for k, v in per_model.items()}
            thresholds = [plan.thresholds[i] for i in order] if plan.thresholds else None
            generators = None
            if method.random:
                generators = []
                for i in order:
                    g = torch.Generator(device=plan.device)
                    g.manual_seed(_rng_seed(recipe.seed, name, plan.experts[i].rng_id))
                    generators.append(g)
            role = plan.reference.arch.tensors.get(name)
            x = KernelInput(name=name, base=base, models=models, params=per_model, shared=shared,
                            generators=generators, thresholds=thresholds, compat=recipe.mergekit_compat,
                            dtype=dtype, out_dtype=out_dtypes[name], conv1d=bool(role and role.conv1d))
            with torch.no_grad():
                merged = method.kernel(x)
            del base, models, x
            yield name, merged.to(out_dtypes[name]).cpu()
            if progress is not None:
                progress.update(merged.numel() * torch.empty((), dtype=out_dtypes[name]).element_size())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def merge_state_dict(recipe: Recipe, inputs: MergeInputs, *, device: str = "cpu", threads: int | None = None,
                     coefficients: list[Coefficients] | None = None) -> dict[str, torch.Tensor]:
    """Merge in memory (small models: evaluation of many candidate merges without touching disk)."""
    with compute_threads(threads, all_cores=recipe.method.compute_bound):
        plan = plan_merge(recipe, inputs, options=MergeOptions(device=device, progress=False),
                          coefficients=coefficients)
        try:
            return dict(iter_merged(plan))
        finally:
            plan.close()


def merge(recipe: Recipe, inputs: MergeInputs, out: str | Path, *, options: MergeOptions = MergeOptions(),
          coefficients: list[Coefficients] | None = None) -> MergeResult:
    """Merge to ``out``: sharded safetensors + config + tokenizer + model card + provenance, renamed into place."""
    out = Path(out)
    start = time.perf_counter()
    all_cores = recipe.method.compute_bound
    with compute_threads(options.threads, all_cores=all_cores):  # the global thresholds are compute too
        plan = plan_merge(recipe, inputs, out=out, options=options, coefficients=coefficients)
    try:
        shard_size = parse_size(options.shard_size)
        progress = None
        if options.progress:
            progress = tqdm(total=sum(s.nbytes for s in plan.specs), unit="B", unit_scale=True,
                            desc=f"merge {recipe.merge_method}", dynamic_ncols=True)
        n_open = sum(i.snapshot.n_files for i in plan.inputs) + len(plan_shards(plan.specs, shard_size))
        ensure_open_files(n_open, "the merge (its inputs' weight files and the output's shards)")
        with _output_errors(out), atomic_directory(out, overwrite=options.overwrite) as tmp, \
                compute_threads(options.threads, all_cores=all_cores):
            provenance = provenance_of(plan)
            writer = ShardedWriter(tmp, plan.specs, shard_size,
                                   metadata={"mergeflow_version": __version__,
                                             "mergeflow_recipe_hash": provenance["recipe_hash"]})
            write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeflow-write")
            try:
                in_flight: list[Future] = []
                for name, tensor in iter_merged(plan, progress):
                    # checked on the writer thread, overlapping the next tensor's compute; a refusal surfaces at
                    # .result() below, still inside the temporary folder
                    in_flight.append(write_pool.submit(_write_finite, writer, name, tensor))
                    if len(in_flight) > 2:  # bound memory held by queued writes
                        in_flight.pop(0).result()
                for f in in_flight:
                    f.result()
            finally:
                write_pool.shutdown(wait=True)
                writer.close()
            writer.finalize()
            _copy_support_files(plan, tmp)
            elapsed = time.perf_counter() - start
            provenance["seconds"] = round(elapsed, 3)
            (tmp / "mergeflow.json").write_text(json.dumps(provenance, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(plan, provenance))
        if progress is not None:
            progress.close()
        return MergeResult(out, provenance["recipe_hash"], plan.input_hashes(), len(plan.specs), writer.total_bytes,
                           time.perf_counter() - start, plan.thresholds, provenance)
    finally:
        plan.close()


@contextlib.contextmanager
def _output_errors(out: Path) -> Iterator[None]:
    """An OSError while the output is written (disk full, quota, I/O error) becomes one line naming the output and
    the cause; a file of the temporary folder is named by its place in the output."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        named = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
        at = None
        if named is not None:
            tmp_prefix = f".{out.name}.tmp-"
            parts = Path(named).parts
            inside = [i for i, part in enumerate(parts) if part.startswith(tmp_prefix)]
            beside = Path(named).parent == out.parent and Path(named).name.startswith(f".{out.name}.")
            if not inside and not beside and Path(named) != out:  # only the output is written: a source failed
                raise storage_error(exc, "read") from exc
            at = str(out.joinpath(*parts[inside[-1] + 1:])) if inside else named
        raise storage_error(exc, "write the output", out, at=None if at == str(out) else at) from exc


def _support_files(plan: MergePlan) -> list[tuple[str, Path]]:
    """The (name, real source path) of each file copied beside the weights: the reference's configs and the
    tokenizer source's files. A file that is a symlink leading outside its checkpoint is refused
    (:class:`~mergeflow.errors.UnsafePathError`), so nothing outside the inputs reaches the output."""
    src = plan.reference.snapshot.model_folder  # a LoRA adapter's config and tokenizer are its base's
    out = []
    for name in _COPIED_FILES:
        real = contained_file(src, name, "checkpoint file")
        if real is not None:
            out.append((name, real))
    if plan.out_tokenizer is not None:
        return out  # a tokenizer built for the output (union, added tokens, chat template) is saved, not copied
    tok_src = _tokenizer_folder(plan)
    for name in TOKENIZER_FILES:
        real = contained_file(tok_src, name, "tokenizer file")
        if real is not None:
            out.append((name, real))
    return out


def _tokenizer_folder(plan: MergePlan) -> Path:
    """The folder whose tokenizer files the output takes unchanged: the vocabulary's source, else the recipe's
    tokenizer_source, else the reference's."""
    if plan.vocabulary is not None and plan.vocabulary.copy_from is not None:
        return plan.vocabulary.copy_from
    src = plan.reference.snapshot.model_folder  # a LoRA adapter's tokenizer is its base's
    tok_ref = plan.recipe.vocabulary_source
    if tok_ref and tok_ref not in ("base", "union"):
        k = input_index(plan.recipe, plan.inputs, tok_ref)
        if k is not None:
            return plan.inputs[k].snapshot.model_folder
        if plan.tokenizer is not None:
            return plan.tokenizer.model_folder
        raise RecipeError(f"tokenizer_source: {tok_ref!r} is not among the merge's inputs and was not resolved")
    return src


def _check_merged_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse a merged tensor holding NaN or Inf (an overflow, or a method's degenerate case): raised inside the
    output's temporary folder, so nothing is renamed into place and a previous output stays as it was."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    nan, inf = count_non_finite(tensor)
    if nan or inf:
        raise NonFiniteResultError(f"the merged tensor {name!r} has {nan + inf} non-finite values ({nan} NaN, {inf} "
                                   f"Inf) of {tensor.numel()}; nothing was written (check the recipe's weights and "
                                   "scales, and the out_dtype's range)")


def _write_finite(writer: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
    _check_merged_finite(name, tensor)
    writer.write(name, tensor)


def _copy_support_files(plan: MergePlan, dest: Path) -> None:
    for name, real in _support_files(plan):
        shutil.copy2(real, dest / name)  # the checked real path: the copy is a plain file, never a link
    if plan.out_tokenizer is not None:
        plan.out_tokenizer.save_pretrained(str(dest))
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    if plan.vocabulary is not None:
        key = "vocab_size" if "vocab_size" in config or "text_config" not in config else None
        if key is None:
            config["text_config"]["vocab_size"] = plan.vocabulary.rows
        else:
            config[key] = plan.vocabulary.rows
    float_dtypes = {s.dtype for s in plan.specs if s.dtype.is_floating_point}
    if len(float_dtypes) == 1:
        out = dtype_name(next(iter(float_dtypes)))
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = out
        if "torch_dtype" not in config and "dtype" not in config:
            config["dtype"] = out
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def provenance_of(plan: MergePlan) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "mergeflow_version": __version__,
        "recipe_hash": recipe.recipe_hash(),
        "recipe": recipe.canonical(),
        "method": recipe.merge_method,
        "paper": plan.method.paper,
        "mergekit_compat": recipe.mergekit_compat,
        "inputs": [_provenance_input(i) for i in plan.inputs],
        "global_thresholds": plan.thresholds,
        "coefficients": [c.summary() for c in plan.coefficients],
        # tokenizer_source: the output vocabulary and how every input's rows were aligned to it
        "vocabulary": None if plan.vocabulary is None else {
            "source": recipe.vocabulary_source, "tokens": plan.vocabulary.n_tokens, "rows": plan.vocabulary.rows,
            "alignment": plan.vocabulary.digest(), "summary": plan.vocabulary.summary},
        "torch_version": torch.__version__,
    }


def _provenance_input(i: Input) -> dict[str, Any]:
    snap = i.snapshot
    out = {"role": i.role, "reference": snap.reference, "content_hash": snap.content_hash, "revision": snap.revision}
    if snap.adapter_base is not None:  # a LoRA adapter: what it was applied to
        base = snap.adapter_base
        out["adapter_base"] = {"reference": base.reference, "content_hash": base.content_hash,
                               "revision": base.revision}
    return out


def model_card(plan: MergePlan, provenance: dict[str, Any]) -> str:
    recipe = plan.recipe
    base_ref = plan.base.snapshot.reference if plan.base else None
    front = ["---", "library_name: transformers", "tags:", "- mergeflow", "- merge", f"- {recipe.merge_method}"]
    if base_ref and not Path(base_ref).is_absolute():
        front.append(f"base_model: {base_ref}")
    front.append("---")
    inputs = "\n".join(f"| {i['role']} | `{i['reference']}` | `{i['content_hash']}` |" for i in provenance["inputs"])
    return "\n".join(front) + f"""

# {recipe.name or 'Merged model'}

Merged with mergeflow {provenance['mergeflow_version']} using **{recipe.merge_method}**
({plan.method.summary}).

Method reference: {plan.method.paper}.
{'Computed with mergekit 0.1.x-compatible semantics (`mergekit_compat: true`).' if recipe.mergekit_compat else ''}

## Inputs

| role | reference | content hash |
|---|---|---|
{inputs}

## Recipe

Recipe hash `{provenance['recipe_hash']}`.

```yaml
{recipe.to_yaml().rstrip()}
```

Provenance (recipe, input hashes, library version) is also in `mergeflow.json` beside the weights.
"""
