"""Merge speed and memory: mergeflow against mergekit 0.1.5 on the same recipes, and against the I/O floor.

Builds (once; reused while the spec matches) a random bf16 Llama-shaped base and two experts (base + small seeded
noise) as HF folders written directly with safetensors, writes task_arithmetic / ties / dare_ties recipes in mergekit
YAML, then runs as subprocesses, each measured for wall time and peak RSS:

- ``mergekit-yaml`` (``--random-seed 0``, default ``--out-shard-size`` of 5B, which buffers the whole output here);
- ``mergeflow merge`` in paper mode (the default) and with ``--mergekit-compat`` (mergekit's semantics, the
  like-for-like comparison the targets apply to);
- the I/O floor: a child that reads every input tensor with ``safe_open`` one at a time and writes one base-sized
  output with ``safetensors.torch.save_file`` (+ fsync, as mergeflow fsyncs its shards).

The SVD-based methods (``--methods task_arithmetic,tsv,iso_c``) have no mergekit equivalent: they get a paper-mode
mergeflow row only, compared with the task_arithmetic paper row of the same invocation (time and peak RSS), and with
the peak ``mergeflow check`` predicts for them (its estimate includes the SVD workspace).

Peak RSS is the kernel's own accounting for each child: ``ru_maxrss`` of the rusage that ``os.wait4`` returns for that
pid (what GNU ``time -v`` prints as "Maximum resident set size"); a sampler of ``/proc/PID/status`` adds the peak
anonymous part (RSS minus mapped file pages) on Linux; this process stays small while it measures so that no child
inherits its RSS (see ``measure``). Every input is read through the page cache before each run, so all runs see a warm
cache; nothing is dropped from it.

mergeflow hashes (sha256) and NaN-scans each checkpoint once and memoises that in ``MERGEFLOW_HOME`` (a fresh folder
under the work dir per invocation); paper-mode TIES also builds a task-vector manifest (global trim thresholds) once
per input content. Runs that pay those one-time costs are reported as their own "cold" rows, never mixed into the
timed (steady-state) rows.

Run: ``.venv/bin/python benchmarks/merge_speed.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors import safe_open

HERE = Path(__file__).resolve().parent
DEFAULT_WORK = HERE / "_work"
SPEC_FORMAT = 1  # bump when the way checkpoints are generated changes: old ones are rebuilt
VOCAB = 32000
HEAD_DIM = 128
INIT_STD = 0.02  # base weights ~ N(0, 0.02²), like a freshly initialised Llama
NOISE_STD = 1e-3  # expert = base + N(0, 1e-3²): ~5% of a weight's scale, ~8 bf16 ulps at |w| = 0.02
METHODS = ("task_arithmetic", "ties", "dare_ties")
SPECTRAL = ("tsv", "iso_c")  # mergeflow only (no mergekit method): paper rows, compared with task_arithmetic's
READ_CHUNK = 16 << 20

# targets from the issue: mergeflow wall time / mergekit wall time (like-for-like = --mergekit-compat rows)
TIME_TARGETS = {"task_arithmetic": 0.5, "ties": 0.25, "dare_ties": 0.5}
FLOOR_TARGET = ("task_arithmetic", 4.0)  # task_arithmetic wall within 4x of the I/O floor's wall
FLOOR_TARGET_3B = 3.0  # issue 16: at the 3B preset, task_arithmetic within 3x of the I/O floor
CHECK_TOLERANCE = 0.10  # issue 16: peak RSS within 10 % of `mergeflow check`'s estimate
SPECTRAL_TIME = {"iso_c": 3.0, "tsv": 6.0}  # issue 12: time ≤ this × task_arithmetic's (paper row, same invocation)


# ------------------------------------------------------------------------------------------------ the checkpoints


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = VOCAB
    init_std: float = INIT_STD
    noise_std: float = NOISE_STD
    experts: int = 2
    format: int = SPEC_FORMAT
    kv_heads: int | None = None  # grouped-query attention: k/v projections of kv_heads·128 rows (None: = heads)
    tied: bool = False  # the LM head is the embedding (no lm_head.weight tensor)
    preset: str | None = None  # the published model whose shape this is, if any

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in tensor_shapes(self))

    def describe(self) -> str:
        kv = f", {self.kv_heads} kv heads" if self.kv_heads and self.kv_heads != self.heads else ""
        return (f"{self.preset + ' shape: ' if self.preset else ''}hidden {self.hidden}, intermediate "
                f"{self.intermediate}, {self.layers} layers, {self.heads} heads{kv}, vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} head")


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


# published shapes picked by --params (within 10 %): the 3B-scale run is Llama-3.2-3B's exact shape
PRESETS = {
    3e9: ModelSpec(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256, tied=True,
                   preset="Llama-3.2-3B"),
}


def choose_spec(params: float) -> ModelSpec:
    """A preset's shape when ``params`` is within 10 % of one (3e9: Llama-3.2-3B, 3.21 B params with its tied
    128256-token embedding); otherwise Llama proportions (intermediate ≈ 8/3 hidden, head dim 128, untied 32k vocab) with about ``params`` weights:
    the widest hidden size that still gives at least 12 layers (0.5e9 → hidden 1536, 14 layers, 0.49 B)."""
    for size, preset in PRESETS.items():
        if abs(params - size) <= 0.1 * size:
            return preset
    layers = 2
    hidden = inter = 256
    for hidden in (4096, 3072, 2560, 2048, 1536, 1024, 768, 512, 256):
        inter = _round_up(hidden * 8 / 3, 256)
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        layers = round((params - 2 * VOCAB * hidden - hidden) / per_layer)
        if layers >= 12:
            break
    return ModelSpec(hidden=hidden, intermediate=inter, layers=max(layers, 2), heads=hidden // HEAD_DIM)


def tensor_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    h, i = spec.hidden, spec.intermediate
    kv = (spec.kv_heads or spec.heads) * HEAD_DIM
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   *[(p + f"self_attn.{m}_proj.weight", (kv if m in "kv" else h, h)) for m in "qkvo"],
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,))] + ([] if spec.tied else [("lm_head.weight", (spec.vocab, h))])
    return shapes


def model_names(spec: ModelSpec) -> list[str]:
    return ["base"] + [f"expert_{chr(ord('a') + k)}" for k in range(spec.experts)]


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def models_ready(root: Path, spec: ModelSpec) -> bool:
    spec_file = root / "spec.json"
    return (spec_file.is_file() and spec_file.read_text() == json.dumps(asdict(spec), sort_keys=True)
            and all((root / name / "model.safetensors.index.json").is_file() for name in model_names(spec)))


def build_models(root: Path, spec: ModelSpec) -> None:
    """Write base + experts as 2-shard HF Llama folders into ``root`` (replaced atomically), with ``spec.json``."""
    folders = [root / name for name in model_names(spec)]
    wanted = json.dumps(asdict(spec), sort_keys=True)

    # a --build-child process: the measuring parent must not import torch before the timed runs (see measure)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    print(f"building base + {spec.experts} experts in {root}: {spec.describe()}, {spec.params / 1e9:.3f} B params "
          "each (bf16)", flush=True)
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads or spec.heads, max_position_embeddings=2048,
                         tie_word_embeddings=spec.tied,
                         torch_dtype="bfloat16")
    shapes = tensor_shapes(spec)
    total = sum(math.prod(s) for _, s in shapes) * 2
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[], []]  # split at half the bytes, in model order
    acc = 0
    for name, shape in shapes:
        shards[0 if acc < total / 2 else 1].append((name, shape))
        acc += math.prod(shape) * 2
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    tmp_folders = [tmp / f.name for f in folders]
    for folder in tmp_folders:
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
    for file, shard in zip(files, shards):
        tensors: list[dict[str, torch.Tensor]] = [{} for _ in tmp_folders]
        for name, shape in shard:
            g = torch.Generator().manual_seed(_seed("base", name))
            # RMSNorm weights start at one, matrices ~ N(0, init_std²)
            base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(spec.init_std)
            base = base.to(torch.bfloat16)
            tensors[0][name] = base
            for k in range(spec.experts):
                g = torch.Generator().manual_seed(_seed("expert", k, name))
                noise = torch.randn(shape, generator=g).mul_(spec.noise_std)
                tensors[k + 1][name] = noise.add_(base.float()).to(torch.bfloat16)
        for folder, state in zip(tmp_folders, tensors):
            save_file(state, str(folder / file), metadata={"format": "pt"})
        del tensors
    weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    for folder in tmp_folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "spec.json").write_text(wanted)
    os.replace(tmp, root)
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def warm_page_cache(folders: list[Path]) -> tuple[int, float]:
    """Read every weight file once (plain reads, nothing kept) so the timed runs find them in the page cache."""
    start = time.perf_counter()
    total = 0
    buffer = bytearray(READ_CHUNK)
    for folder in folders:
        for path in weight_files(folder):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    return total, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- the recipes


def write_recipes(folder: Path, models: list[Path], methods: list[str]) -> dict[str, Path]:
    """mergekit YAML with absolute paths (mergekit resolves relative paths against its cwd, mergeflow against the
    recipe's folder; an ``a/b`` path would also send mergekit's model-card code to the hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    base, experts = models[0], models[1:]
    recipes = {}
    for method in methods:
        params = "{weight: 0.5}" if method == "task_arithmetic" else "{weight: 0.5, density: 0.5}"
        lines = [f"merge_method: {method}", f"base_model: {base.resolve()}", "models:"]
        for expert in experts:
            lines += [f"  - model: {expert.resolve()}"]
            if method not in SPECTRAL:  # tsv / iso_c take no per-model parameters (λ = 1 on the whole update)
                lines += [f"    parameters: {params}"]
        lines += ["dtype: bfloat16", ""]
        path = folder / f"{method}.yaml"
        path.write_text("\n".join(lines))
        recipes[method] = path
    return recipes


# ---------------------------------------------------------------------------------------------------- measurement


@dataclass
class Run:
    recipe: str  # method name, or "-" for the I/O floor
    side: str  # "mergekit", "mergeflow compat", "mergeflow paper", "I/O floor"
    wall_s: float
    peak_rss: int  # bytes: ru_maxrss of this child (os.wait4)
    peak_anon: int | None  # bytes: highest sampled RssAnon (Linux), i.e. without page-cache-backed mapped files
    cpu_s: float  # user + system time of the child
    load1: float  # 1-minute load average just before the run
    cold: str = ""  # the one-time costs this run paid ("" for a steady-state run)
    repeats: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class ProcSampler(threading.Thread):
    """Samples /proc/PID/status every 50 ms (Linux only; None elsewhere): the peak RssAnon, and VmHWM (the child's
    own RSS high-water mark) as a cross-check of ru_maxrss."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.peak: dict[str, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    self.peak[key] = max(self.peak.get(key, 0), int(rest.split()[0]) * 1024)
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass
class Measured:
    wall_s: float
    peak_rss: int  # ru_maxrss of the child, bytes
    peak_anon: int | None  # sampled
    hwm_sampled: int | None  # sampled VmHWM
    cpu_s: float
    rc: int


def measure(cmd: list[str], env: dict[str, str], log: Path) -> Measured:
    """Run ``cmd`` as a child and account for it alone: wall time, and the rusage that ``os.wait4`` returns for its pid.

    Linux seeds a child's ru_maxrss with the RSS of the process it was forked from (the old mm's high-water mark is
    folded in at exec), so the benchmark process itself must stay small while it measures: it never imports torch
    before the timed runs are over (the checkpoints are built in a child). ``main`` checks that.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = ProcSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        sampler.stop()
    return Measured(wall, _maxrss_bytes(usage.ru_maxrss), sampler.peak.get("RssAnon"), sampler.peak.get("VmHWM"),
                    usage.ru_utime + usage.ru_stime, proc.returncode)


def _maxrss_bytes(ru_maxrss: int) -> int:
    return ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def own_peak_rss() -> int:
    return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


class Bench:
    def __init__(self, args: argparse.Namespace, models: list[Path], env: dict[str, str]) -> None:
        self.args = args
        self.models = models
        self.env = env
        self.work: Path = args.work
        self.runs: list[Run] = []

    def once(self, recipe: str, side: str, cmd: list[str], out: Path, tag: str) -> Run:
        warm_page_cache(self.models)
        fresh(out)
        load1 = os.getloadavg()[0]
        m = measure(cmd, self.env, self.work / "logs" / f"{tag}.log")
        if m.rc != 0:
            tail = (self.work / "logs" / f"{tag}.log").read_text().splitlines()[-15:]
            raise SystemExit(f"{side} {recipe} failed (exit {m.rc}):\n" + "\n".join(tail))
        print(f"  {side:<18} {recipe:<16} {m.wall_s:7.1f} s  {m.peak_rss / 1e9:5.2f} GB  (load {load1:.2f})",
              flush=True)
        return Run(recipe, side, m.wall_s, m.peak_rss, m.peak_anon, m.cpu_s, load1, repeats=[m.wall_s],
                   extra={"hwm_sampled": m.hwm_sampled})

    def timed(self, recipe: str, side: str, cmd: list[str], out: Path, tag: str) -> Run:
        """``--repeat`` runs: the best wall time, the highest peak RSS."""
        best = self.best([self.once(recipe, side, cmd, out, f"{tag}.{k}") for k in range(self.args.repeat)])
        self.runs.append(best)
        return best

    def floor(self, cmd: list[str], out: Path, tag: str) -> list[Run]:
        """``--repeat`` runs of the I/O floor child, each with its own timing breakdown (the child's last line)."""
        runs = []
        for k in range(self.args.repeat):
            run = self.once("-", "I/O floor", cmd, out, f"{tag}.{k}")
            run.extra |= json.loads((self.work / "logs" / f"{tag}.{k}.log").read_text().splitlines()[-1])
            runs.append(run)
        shutil.rmtree(out, ignore_errors=True)
        return runs

    @staticmethod
    def best(runs: list[Run]) -> Run:
        best = min(runs, key=lambda r: r.wall_s)
        best.peak_rss = max(r.peak_rss for r in runs)
        anons = [r.peak_anon for r in runs if r.peak_anon is not None]
        best.peak_anon = max(anons) if anons else None
        best.repeats = [r.wall_s for r in runs]
        return best


def mergekit_cmd(recipe: Path, out: Path) -> list[str]:
    return [_tool("mergekit-yaml"), str(recipe), str(out), "--random-seed", "0", "--no-write-model-card", "--quiet"]


def mergeflow_cmd(recipe: Path, out: Path, compat: bool) -> list[str]:
    cmd = [_tool("mergeflow"), "merge", str(recipe), str(out), "--no-progress", "--seed", "0"]
    return cmd + (["--mergekit-compat"] if compat else [])


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} nor on PATH")
    return found


# ----------------------------------------------------------------------------------------------------- I/O floor


def io_floor(models: list[Path], out: Path) -> dict[str, float]:
    """Read every input tensor (safe_open + a copy out of the mapping, one tensor at a time, in the base's order) and
    write one base-sized output in the base's shard layout with save_file, then fsync it. Runs in a child so its wall includes the same interpreter
    start and torch import that the merge tools pay."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (safetensors.torch needs it; its import is part of every merge's cost too)
    from safetensors.torch import save_file

    t_import = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((models[0] / "model.safetensors.index.json").read_text())
    by_file: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        by_file.setdefault(file, []).append(name)
    t_read = t_write = 0.0
    read_bytes = 0
    for file in sorted(by_file):
        t = time.perf_counter()
        shard = {}
        handles = [safe_open(str(m / file), framework="pt") for m in models]
        for name in by_file[file]:
            # get_tensor maps the file without copying: clone() is the actual read (page cache -> process memory)
            tensors = [h.get_tensor(name).clone() for h in handles]
            read_bytes += sum(x.numel() * x.element_size() for x in tensors)
            shard[name] = tensors[0]
        del handles
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        save_file(shard, str(out / file), metadata={"format": "pt"})
        t_write += time.perf_counter() - t
        del shard
    t = time.perf_counter()
    for path in out.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    t_fsync = time.perf_counter() - t
    return {"import_s": t_import, "read_s": t_read, "write_s": t_write, "fsync_s": t_fsync,
            "read_gb": read_bytes / 1e9}


# --------------------------------------------------------------------------------------------------- verification


def _open_checkpoint(folder: Path) -> dict[str, Any]:
    handles = {}
    for path in weight_files(folder):
        h = safe_open(str(path), framework="pt")
        for name in h.keys():  # noqa: SIM118  (a safe_open handle is not iterable)
            handles[name] = h
    return handles


def compare(ours: Path, theirs: Path, watch: list[str], only_watched: bool = False) -> dict[str, Any]:
    """Tensor by tensor (all of them, or only ``watch``): same names/shapes/dtypes, all finite, max |diff|, max diff in
    ulps of the output dtype (at the tensor's rms scale or above), the fraction of elements that differ, and max |diff|
    of each tensor in ``watch``."""
    import torch  # verification runs after the timed runs: the parent stays torch-free until then (see measure)

    a, b = _open_checkpoint(ours), _open_checkpoint(theirs)
    result: dict[str, Any] = {"tensors": "watched" if only_watched else "all",
                              "missing": sorted(set(b) - set(a)), "extra": sorted(set(a) - set(b)),
                              "mismatched": [], "non_finite": [], "max_abs": 0.0, "max_ulps": 0.0,
                              "differing": 0, "numel": 0, "watched": {}}
    for name in sorted(set(a) & set(b)):
        if only_watched and name not in watch:
            continue
        ta, tb = a[name].get_tensor(name), b[name].get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            result["mismatched"].append(name)
            continue
        if not (bool(torch.isfinite(ta.max())) and bool(torch.isfinite(ta.min()))):  # max/min propagate NaN, show Inf
            result["non_finite"].append(name)
        fa, fb = ta.float(), tb.float()
        diff = fa.sub_(fb).abs_()
        n_diff = int(torch.count_nonzero(diff))
        if n_diff:
            # ulp in the output dtype of max(|a|, |b|, rms of the tensor) — the rms floor keeps entries that merely
            # happen to be near zero from inflating the count; ulp = eps · 2^(exponent − 1), frexp's mantissa ∈ [0.5, 1)
            fa = ta.float()
            scale = torch.maximum(fa.abs_(), fb.abs()).clamp_min_(float(fb.square().mean().sqrt()))
            _, exponent = torch.frexp(scale)
            ulps = diff / torch.ldexp(torch.tensor(torch.finfo(ta.dtype).eps), exponent.sub_(1).float())
            result["max_ulps"] = max(result["max_ulps"], float(ulps.max()))
            result["max_abs"] = max(result["max_abs"], float(diff.max()))
        result["differing"] += n_diff
        result["numel"] += diff.numel()
        if name in watch:
            result["watched"][name] = float(diff.max())
    result["fraction_differing"] = result["differing"] / max(result["numel"], 1)
    return result


def watched_tensors(spec: ModelSpec) -> list[str]:
    mid = spec.layers // 2
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{mid}.mlp.down_proj.weight", "model.norm.weight"] + ([] if spec.tied else ["lm_head.weight"])


def disk_needed(spec: ModelSpec, methods: list[str], *, models_ready: bool, skip_mergekit: bool) -> int:
    """Bytes the invocation writes under WORK: the checkpoints when they must be built, every merged output (kept
    until the end, where they are compared), the I/O floor's output, and 1 GB of slack (logs, HF caches)."""
    one = spec.params * 2  # bf16
    outputs = sum(1 if m in SPECTRAL else 2 + (0 if skip_mergekit else 1) for m in methods) + 1
    return (0 if models_ready else (spec.experts + 1) * one) + outputs * one + (1 << 30)


# --------------------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def render_table(runs: list[Run], floor: Run | None) -> str:
    mergekit = {r.recipe: r for r in runs if r.side == "mergekit"}
    header = ("recipe", "side", "wall s", "peak RSS GB", "anon GB", "cpu s", "load", "×mk time", "×mk RSS", "×mk cpu",
              "×floor")
    rows = []
    for r in runs:
        mk = mergekit.get(r.recipe)
        side = r.side + (f" (cold: {r.cold})" if r.cold else "")
        theirs = mk is not None and r is not mk and r.side != "I/O floor"
        rows.append((r.recipe, side, _fmt(r.wall_s, 1), _fmt(r.peak_rss / 1e9),
                     _fmt(None if r.peak_anon is None else r.peak_anon / 1e9), _fmt(r.cpu_s, 1), _fmt(r.load1),
                     _fmt(r.wall_s / mk.wall_s, 3, "×") if theirs else "",
                     _fmt(r.peak_rss / mk.peak_rss, 2, "×") if theirs else "",
                     _fmt(r.cpu_s / mk.cpu_s, 2, "×") if theirs else "",
                     _fmt(r.wall_s / floor.wall_s, 1, "×") if floor and r is not floor else ""))
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w)  # noqa: E731
                                 for k, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def render_spectral(runs: list[Run], predicted: dict[str, int]) -> str:
    """The SVD-based rows against task_arithmetic's paper row of the same invocation, and against the peak memory
    ``mergeflow check`` predicts for them (the engine's streaming estimate plus the SVD workspace)."""
    ta = next((r for r in runs if r.recipe == "task_arithmetic" and r.side == "mergeflow paper" and not r.cold), None)
    lines = ["", "SVD-based methods (mergeflow paper mode; no mergekit equivalent):"]
    for r in runs:
        key = f"{r.recipe} paper"
        if r.recipe not in SPECTRAL or key not in predicted or r.cold or r.side != "mergeflow paper":
            continue
        vs_ta = (f"{r.wall_s / ta.wall_s:.1f}× task_arithmetic's time, {r.peak_rss / ta.peak_rss:.2f}× its peak RSS"
                 if ta else "no task_arithmetic row in this invocation")
        lines.append(f"  {r.recipe:<8} {r.wall_s:7.1f} s  {r.peak_rss / 1e9:5.2f} GB peak RSS "
                     f"(check predicted {predicted[key] / 1e9:.2f} GB): {vs_ta}")
    return "\n".join(lines)


def estimate_targets(runs: list[Run], predicted: dict[str, int], spec: ModelSpec,
                     baseline_rss: int) -> list[tuple[str, str, str]]:
    """Targets against predictions: every mergeflow row's peak RSS within 10 % of what ``mergeflow check``
    predicts for its recipe in its mode (issue 16), and the SVD-based rows' time (≤ 3× task_arithmetic for iso_c, ≤ 6× for
    tsv) and memory: ≤ (K + 2) × the largest tensor in fp32 plus that tensor's SVD workspace
    (``spectral.workspace_elements``), on top of the interpreter and libraries (``baseline_rss``: the peak RSS of
    a child that only imports them) (issue 12). Imports torch: call it after the measurements."""
    from mergeflow.methods.spectral import workspace_elements

    out: list[tuple[str, str, str]] = []
    for r in (r for r in runs if r.side.startswith("mergeflow") and not r.cold):
        key = f"{r.recipe} {r.side.split()[1]}"
        if key in predicted:
            ratio = r.peak_rss / predicted[key]
            out.append((f"{key}: peak RSS within {CHECK_TOLERANCE:.0%} of mergeflow check's estimate",
                        f"{r.peak_rss / 1e9:.2f} GB / {predicted[key] / 1e9:.2f} GB = {ratio:.2f}×",
                        "PASS" if abs(ratio - 1) <= CHECK_TOLERANCE else "FAIL"))
    steady = [r for r in runs if r.side == "mergeflow paper" and not r.cold]
    ta = next((r for r in steady if r.recipe == "task_arithmetic"), None)
    largest = max((shape for _, shape in tensor_shapes(spec)), key=math.prod)
    k = spec.experts
    for r in (r for r in steady if r.recipe in SPECTRAL_TIME):
        if ta is not None:
            ratio = r.wall_s / ta.wall_s
            out.append((f"{r.recipe}: time ≤ {SPECTRAL_TIME[r.recipe]:g}× task_arithmetic's (paper rows)",
                        f"{r.wall_s:.1f} s / {ta.wall_s:.1f} s = {ratio:.2f}×",
                        "PASS" if ratio <= SPECTRAL_TIME[r.recipe] else "FAIL"))
        tensors = (k + 2) * math.prod(largest) * 4
        workspace = workspace_elements(r.recipe, largest, k) * 4
        bound = baseline_rss + tensors + workspace
        out.append((f"{r.recipe}: peak RSS ≤ imports + (K+2)×largest fp32 + SVD workspace",
                    f"{r.peak_rss / 1e9:.2f} GB vs {baseline_rss / 1e9:.2f} + {tensors / 1e9:.2f} + "
                    f"{workspace / 1e9:.2f} = {bound / 1e9:.2f} GB ({'×'.join(map(str, largest))}, K={k})",
                    "PASS" if r.peak_rss <= bound else "FAIL"))
    return out


def check_estimate(recipe: Path, env: dict[str, str], compat: bool) -> int:
    """The peak memory ``mergeflow check --json`` predicts for ``recipe`` in paper or compat mode (untimed; a child,
    like every run)."""
    done = subprocess.run([_tool("mergeflow"), "check", str(recipe), "--json",
                           *(["--mergekit-compat"] if compat else [])], capture_output=True, text=True,
                          env=env, check=True)
    return int(json.loads(done.stdout)["estimate"]["peak_bytes"])


def evaluate_targets(runs: list[Run], floor: Run | None, floor_limit: float = FLOOR_TARGET[1]
                     ) -> list[tuple[str, str, str]]:
    """(target, measured, verdict). Time targets apply to the --mergekit-compat rows (same semantics as mergekit);
    the paper rows are checked too and marked as such. RSS: every steady and cold mergeflow row."""
    out: list[tuple[str, str, str]] = []
    mergekit = {r.recipe: r for r in runs if r.side == "mergekit"}
    steady = [r for r in runs if r.side.startswith("mergeflow") and not r.cold]
    for r in steady:
        mk = mergekit.get(r.recipe)
        if mk is None or r.recipe not in TIME_TARGETS:
            continue
        ratio = r.wall_s / mk.wall_s
        limit = TIME_TARGETS[r.recipe]
        note = "" if r.side.endswith("compat") else " [paper mode: different semantics, info]"
        out.append((f"{r.recipe}: {r.side} time ≤ {limit}× mergekit{note}",
                    f"{r.wall_s:.1f} s / {mk.wall_s:.1f} s = {ratio:.3f}×", "PASS" if ratio <= limit else "FAIL"))
    for r in (r for r in runs if r.side.startswith("mergeflow")):
        mk = mergekit.get(r.recipe)
        if mk is None:
            continue
        label = r.side + (f" (cold: {r.cold})" if r.cold else "")
        out.append((f"{r.recipe}: {label} peak RSS ≤ mergekit's",
                    f"{r.peak_rss / 1e9:.2f} GB / {mk.peak_rss / 1e9:.2f} GB = {r.peak_rss / mk.peak_rss:.2f}×",
                    "PASS" if r.peak_rss <= mk.peak_rss else "FAIL"))
    method, limit = FLOOR_TARGET[0], floor_limit
    if floor is not None:
        for r in (r for r in steady if r.recipe == method):
            ratio = r.wall_s / floor.wall_s
            out.append((f"{method}: {r.side} time ≤ {limit}× I/O floor",
                        f"{r.wall_s:.1f} s / {floor.wall_s:.1f} s = {ratio:.2f}×",
                        "PASS" if ratio <= limit else "FAIL"))
    return out


# ----------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=0.5e9, help="parameters per checkpoint (base and each expert)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help="work folder: checkpoints (reused), recipes, outputs, logs, MERGEFLOW_HOME")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS + SPECTRAL)} ({', '.join(SPECTRAL)}: "
                        "mergeflow paper rows only, compared with task_arithmetic's)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per row (best wall time, highest peak RSS)")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--skip-mergekit", action="store_true", help="run mergeflow and the I/O floor only")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged models under WORK/out")
    p.add_argument("--freeze", action="store_true",
                   help="run a copy of the mergeflow package taken at the start (WORK/frozen, via PYTHONPATH), so "
                        "edits to the working tree during the run cannot mix two versions into one table")
    p.add_argument("--io-floor-child", nargs=2, metavar=("MODELS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--build-child", nargs=2, metavar=("MODELS", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS + SPECTRAL))
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS + SPECTRAL)}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def child_env(work: Path, mergeflow_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MERGEFLOW_HOME": str(mergeflow_home), "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"})
    return env


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for package in ("torch", "safetensors", "mergekit", "mergeflow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "-"
    return found


def mergeflow_package() -> Path | None:
    spec = importlib.util.find_spec("mergeflow")  # locates the package without importing it (and torch)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def code_fingerprint(package: Path | None) -> dict[str, str]:
    """What mergeflow code ran: the git commit (+dirty flag for mergeflow/) and a hash of the package's .py files, taken
    at the start and the end so that a change in the middle of a run (a concurrent edit or commit) is reported."""
    if package is None:
        return {"mergeflow": "not found"}
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    found = {"sources_sha256": digest.hexdigest()[:16]}
    try:
        git = ["git", "-C", str(package.parent)]
        found["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", str(package)], capture_output=True, text=True,
                               check=True).stdout.strip()
        found["commit"] += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        pass
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_child:
        build_models(Path(args.build_child[0]), ModelSpec(**json.loads(args.build_child[1])))
        return 0
    if args.io_floor_child:
        models_dir, out = map(Path, args.io_floor_child)
        spec = json.loads((models_dir / "spec.json").read_text())
        models = [models_dir / name for name in model_names(ModelSpec(**spec))]
        print(json.dumps(io_floor(models, out)))
        return 0

    work: Path = args.work.resolve()
    args.work = work
    spec = choose_spec(args.params)
    models = [work / "models" / name for name in model_names(spec)]
    ready = models_ready(work / "models", spec)
    work.mkdir(parents=True, exist_ok=True)
    needed = disk_needed(spec, args.methods, models_ready=ready, skip_mergekit=args.skip_mergekit)
    free = shutil.disk_usage(work).free
    if free < needed:  # checked before anything is built or run: a clear refusal, not a full disk mid-run
        raise SystemExit(f"merge_speed: {work} has {free / 1e9:.1f} GB free, this invocation needs "
                         f"{needed / 1e9:.1f} GB ({'' if ready else 'the checkpoints, '}every output kept until the "
                         f"comparison at the end); free space, pass --work on a larger disk, or fewer --methods")
    if ready:
        print(f"reusing the checkpoints in {work / 'models'} ({spec.params / 1e9:.3f} B params each)")
    else:  # in a child, so that this process stays small (see measure())
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-child", str(work / "models"),
                        json.dumps(asdict(spec))], check=True)
    recipes = write_recipes(work / "recipes", models, args.methods)
    home = fresh(work / "mergeflow_home")  # fresh per invocation: the first-run costs show up in every report
    env = child_env(work, home)
    package = mergeflow_package()
    code_start = code_fingerprint(package)
    if args.freeze and package is not None:
        # run a copy of the package as it is now: concurrent edits of the working tree cannot leak into the runs
        frozen = fresh(work / "frozen") / "mergeflow"
        shutil.copytree(package, frozen, ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(frozen.parent), env.get("PYTHONPATH")]))
        package = frozen
        code_start["frozen_copy"] = "yes"
    print(f"mergeflow code: {code_start}")
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)} ({os.cpu_count()} cpus)")

    nbytes, seconds = warm_page_cache(models)
    nbytes, seconds = warm_page_cache(models)
    print(f"page cache warmed: {nbytes / 1e9:.2f} GB of inputs re-read in {seconds:.2f} s; every run below is "
          "preceded by the same warm read (nothing is ever dropped from the cache)")
    modules = "torch, safetensors.torch, transformers, mergeflow.engine" + ("" if args.skip_mergekit
                                                                          else ", mergekit.merge")
    imports = [sys.executable, "-c", f"import {modules}"]
    subprocess.run(imports, env=env, check=True)  # first import of the libraries from disk, untimed
    startup_run = measure(imports, env, work / "logs" / "imports.log")
    startup = startup_run.wall_s
    print(f"interpreter start + imports ({modules}): {startup:.1f} s")

    bench = Bench(args, models, env)
    out = work / "out"
    floor_cmd = [sys.executable, str(Path(__file__).resolve()), "--io-floor-child", str(work / "models"),
                 str(out / "io_floor")]
    floor_runs = bench.floor(floor_cmd, out / "io_floor", "io_floor.start")

    paid: set[str] = set()  # one-time mergeflow costs already paid in this MERGEFLOW_HOME
    predicted: dict[str, int] = {}
    for method in args.methods:
        spectral = method in SPECTRAL
        if not args.skip_mergekit and not spectral:
            bench.timed(method, "mergekit", mergekit_cmd(recipes[method], out / method / "mergekit"),
                        out / method / "mergekit", f"{method}.mergekit")
        for compat in (False,) if spectral else (True, False):
            side = "mergeflow " + ("compat" if compat else "paper")
            target = out / method / side.replace(" ", "_")
            cmd = mergeflow_cmd(recipes[method], target, compat)
            pending = [c for c in ("hash + NaN scan", "task-vector manifest")
                       if c not in paid and (c.startswith("hash") or (method == "ties" and not compat))]
            if pending:
                cold = bench.once(method, side, cmd, target, f"{method}.{side.replace(' ', '_')}.cold")
                cold.cold = " + ".join(pending)
                bench.runs.append(cold)
                paid.update(pending)
            bench.timed(method, side, cmd, target, f"{method}.{side.replace(' ', '_')}")
        # after its runs, so that check's hashing of the inputs cannot turn a cold row warm
        for compat in (False,) if spectral else (True, False):
            predicted[f"{method} {'compat' if compat else 'paper'}"] = check_estimate(recipes[method], env, compat)
    # the floor again at the end (the load on a shared machine drifts): the best of both ends counts
    floor = bench.best(floor_runs + bench.floor(floor_cmd, out / "io_floor", "io_floor.end"))
    bench.runs.insert(0, floor)
    load_end = os.getloadavg()
    code_end = code_fingerprint(package) | ({"frozen_copy": "yes"} if args.freeze else {})
    if args.freeze:
        code_end["commit"] = code_start.get("commit", "")  # the copy is not a git checkout
    parent_rss = own_peak_rss()  # before verification imports torch here
    smallest = min(r.peak_rss for r in bench.runs)

    verification: dict[str, Any] = {}
    if not args.skip_mergekit:
        print("verifying outputs against mergekit's ...", flush=True)
        watch = watched_tensors(spec)
        for method in (m for m in args.methods if m not in SPECTRAL):
            for mode in ("compat", "paper"):
                # every tensor where compat claims mergekit's exact result; the few watched ones elsewhere (they
                # differ by design, and a full comparison costs minutes)
                full = mode == "compat" and method in ("task_arithmetic", "ties")
                verification[f"{method} {mode}"] = compare(out / method / f"mergeflow_{mode}", out / method / "mergekit",
                                                           watch, only_watched=not full)
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)

    runs = bench.runs  # the I/O floor first, then each recipe's rows
    print()
    print(f"checkpoints: base + {spec.experts} experts, {spec.params / 1e9:.3f} B params each, bf16, 2 shards "
          f"({spec.describe()}); "
          f"recipes: weights 0.5/0.5, density 0.5 (ties, dare_ties), dtype bfloat16")
    print(f"mergeflow code: {code_start}" + ("" if code_end == code_start else
                                             f" -- WARNING: CHANGED DURING THE RUN, now {code_end}: rerun"))
    print(f"load average: start {' '.join(f'{x:.2f}' for x in load_start)}, "
          f"end {' '.join(f'{x:.2f}' for x in load_end)} ({os.cpu_count()} cpus)")
    print(render_table(runs, floor))
    if any(m in SPECTRAL for m in predicted):
        print(render_spectral(runs, predicted))
    print(f"I/O floor detail: import {floor.extra['import_s']:.1f} s, read {floor.extra['read_gb']:.2f} GB in "
          f"{floor.extra['read_s']:.2f} s, write {floor.extra['write_s']:.2f} s, fsync {floor.extra['fsync_s']:.2f} s "
          f"(its wall includes interpreter start and the torch import, like every row); interpreter start + "
          f"imports alone ({modules}): {startup:.1f} s")
    print(f"this process peaked at {parent_rss / 1e6:.0f} MB while measuring, below every child's peak "
          f"({smallest / 1e9:.2f} GB or more), so no child's ru_maxrss is inherited from it" if parent_rss < smallest
          else f"WARNING: this process peaked at {parent_rss / 1e9:.2f} GB, not below every child's ru_maxrss "
               f"({smallest / 1e9:.2f} GB): those figures may be inherited at fork/exec")
    print("wall includes interpreter start and imports; peak RSS = ru_maxrss of the child from os.wait4 (what GNU "
          "time -v reports); anon = highest sampled RssAnon (RSS without mapped files: shared libraries, safetensors "
          "mmaps); wall = best of --repeat (the I/O floor: of --repeat runs at the start and as many at the end); cold rows are "
          "single first runs; load = 1-min load average at the start; ×mk cpu = CPU-time ratio (less sensitive to "
          "other load than wall time)")

    verdicts = evaluate_targets(runs, floor, FLOOR_TARGET_3B if spec.preset == "Llama-3.2-3B" else FLOOR_TARGET[1])
    verdicts += estimate_targets(runs, predicted, spec, startup_run.peak_rss)
    if verification:
        print("\noutputs vs mergekit's (all tensors):")
        for key, v in verification.items():
            method, mode = key.split()
            exact_expected = mode == "compat" and method in ("task_arithmetic", "ties")
            structural = not (v["missing"] or v["extra"] or v["mismatched"] or v["non_finite"])
            watched = ", ".join(f"{n.removeprefix('model.')} {d:.2g}" for n, d in v["watched"].items())
            print(f"  {key:<22} {v['tensors']:>7} tensors: max |diff| {v['max_abs']:.3g} ({v['max_ulps']:.2g} ulp), "
                  f"differing {100 * v['fraction_differing']:.4f}% of {v['numel'] / 1e6:.0f} M; {watched}"
                  + ("" if structural else f"; PROBLEMS: missing {v['missing'][:3]} extra {v['extra'][:3]} "
                     f"mismatched {v['mismatched'][:3]} non-finite {v['non_finite'][:3]}"))
            if exact_expected:
                ok = structural and v["max_ulps"] <= 1
                verdicts.append((f"{method}: mergeflow compat output = mergekit's (≤ 1 bf16 ulp)",
                                 f"max {v['max_ulps']:.2g} ulp, {100 * v['fraction_differing']:.4f}% differ",
                                 "PASS" if ok else "FAIL"))
            elif not structural:
                verdicts.append((f"{key}: tensors present, shaped and finite", "see above", "FAIL"))
    print("\ntargets:")
    width = max((len(t) for t, _, _ in verdicts), default=0)
    for target, measured, verdict in verdicts:
        print(f"  {verdict:<4}  {target:<{width}}  {measured}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "spec": {**asdict(spec), "params": spec.params}, "versions": versions(),
            "mergeflow_code": {"start": code_start, "end": code_end},
            "load_start": load_start, "load_end": load_end, "startup_s": startup,
            "startup_peak_rss": startup_run.peak_rss, "benchmark_process_peak_rss": parent_rss,
            "runs": [asdict(r) for r in runs], "verification": verification, "check_predicted_peak": predicted,
            "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in verdicts],
        }, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
