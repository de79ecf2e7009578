"""Lazy sharded safetensors reading and planned, atomic sharded writing.

Reading keeps one ``safe_open`` handle per shard and returns one tensor at a time, so memory holds only the tensors
being merged. Writing is *planned*: every output tensor's name, shape and dtype is known before the merge starts (they
are the base model's), so the shard layout and safetensors headers are written up front and each merged tensor's bytes
go straight to their final offset with ``os.pwrite``. There is no shard buffer to fill and flush, and tensors may be
written in any order (for instance by a background writer thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergeflow.errors import CheckpointError, OutputPathError, StorageError, describe_os_error, storage_error
from mergeflow.paths import HOST_TAG, left_by_a_gone_process

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes <-> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _code, _attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):  # float8 types depend on the torch version
        _ST_DTYPES[_code] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Parse a byte size such as ``1GB``, ``500M``, ``2GiB`` or a plain integer."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"cannot parse size {value!r}; use e.g. 1GB, 500MB, 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    size = int(number * base**power)
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


# ------------------------------------------------------------------------------------- reading weight files

# Bits per element of every safetensors dtype (F4/F6 pack several elements per byte).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}

_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate the header of a safetensors file without reading any tensor data.

    Checks what safetensors itself checks when opening, so a truncated or corrupt file is caught here, with the
    file named: header length sane, JSON valid, every dtype known, ``shape × itemsize`` equal to the offset span,
    offsets contiguous from 0, and the data section exactly as long as the last offset.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {header_len} is not sane)")
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes "
                                      f"does not fit in {size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")

    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append(_check_entry(path, name, info))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r} starts at byte {begin}, "
                                  f"expected {cursor}: gap or overlap)")
        cursor = end
    data_len = size - 8 - header_len
    if cursor > data_len:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, expected {8 + header_len + cursor}"
                              f"; tensor data ends past end of file)")
    if cursor < data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - cursor} bytes after the last tensor)")
    return header


def _check_entry(path: Path, name: str, info: Any) -> tuple[int, int, str]:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r}: {problem})")

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"bad data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise bad(f"shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets span {end - begin}")
    return begin, end, name



def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle state dict safely: ``weights_only=True`` refuses anything but tensors and plain containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError for damaged archives
        raise CheckpointError(f"{path}: refused or unreadable pickle checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: pickle checkpoint is not a state dict (name -> tensor)")
    return state


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class TensorReader(Protocol):
    """What reads a model's tensors one at a time: :class:`CheckpointReader`, or an adapter expert's
    :class:`mergeflow.adapters.LoraReader` over its base's."""

    folder: Path

    @property
    def specs(self) -> Mapping[str, TensorSpec]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def read_json_object(path: Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path`` (a checkpoint's or an adapter's config); ``error`` with one line if the file cannot
    be read, is not JSON, or holds something other than an object."""
    try:
        parsed = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise error(f"{path} is not a JSON object")
    return parsed


class SpecsView:
    """Name lookups over a reader's ``_specs`` (name → :class:`TensorSpec`), shared by the checkpoint reader and
    the readers that wrap it (a LoRA adapter over its base)."""

    _specs: dict[str, TensorSpec]

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    @property
    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs


class CheckpointReader(SpecsView):
    """One model's tensors, read one at a time from safetensors (or, if allowed, pickle) shards.

    Safetensors tensors are read with ``os.pread`` straight into a fresh buffer: one copy from the page cache, the GIL
    released while it happens (so a prefetch thread really overlaps with compute), and no file mapping that would make
    every byte of every input count in the process's resident memory. Each returned tensor is private to the caller.
    """

    def __init__(self, folder: Path, weight_files: Sequence[str], *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute offset, nbytes)
        self._specs: dict[str, TensorSpec] = {}
        self._fds: dict[str, int] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        for file in weight_files:
            path = self.folder / file
            if file.endswith(".safetensors"):
                header = read_safetensors_header(path)  # validated: known dtypes, contiguous offsets, no truncation
                try:
                    with path.open("rb") as f:
                        header_len = int.from_bytes(f.read(8), "little")
                except OSError as exc:
                    raise CheckpointError(f"cannot read {path}: {describe_os_error(exc)}") from exc
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    dtype = _ST_DTYPES.get(info["dtype"])
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
                    self._add(name, file, TensorSpec(name, tuple(info["shape"]), dtype))
                    self._where[name] = (file, 8 + header_len + begin, end - begin)
                try:
                    self._fds[file] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot read {path}: {describe_os_error(exc)}") from exc
            elif allow_pickle:
                state = load_pickle(path)
                self._pickled[file] = state
                for name, t in state.items():
                    self._add(name, file, TensorSpec(name, tuple(t.shape), t.dtype))
            else:
                raise CheckpointError(f"{path} is a pickle file; set allow_pickle: true in the recipe to load it")

    def _add(self, name: str, file: str, spec: TensorSpec) -> None:
        if name in self._specs:
            raise CheckpointError(f"{self.folder}: tensor {name!r} appears in two weight files (the second: {file})")
        self._specs[name] = spec

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in a buffer of its own."""
        spec = self._specs.get(name)
        if spec is None:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}")
        where = self._where.get(name)
        if where is None:
            return next(state[name] for state in self._pickled.values() if name in state)
        file, offset, nbytes = where
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(self._fds[file], [view[done:]], offset + done)
            except OSError as exc:
                raise CheckpointError(f"cannot read tensor {name!r} from {self.folder / file}: "
                                      f"{describe_os_error(exc)}") from exc
            if n <= 0:
                raise CheckpointError(f"{self.folder / file}: unexpected end of file reading tensor {name!r} "
                                      "(the file changed or was truncated after it was opened)")
            done += n
        return buf.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# Written bytes of one shard after which the writer asks the kernel to start writing them back to the disk
# (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which returns without waiting). Without it a merge's whole output sits
# dirty in the page cache until the final fsync, which then waits for all of it (1.5 s of a 7 s 0.5 B merge here)
# instead of overlapping the write-back with the merge of the later tensors.
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages to the disk, without waiting for them (durability still
    comes from the fsync that follows; this only starts it earlier). False where the system has no such call."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


class ShardedWriter:
    """Writes a known set of tensors into HF-style safetensors shards, each tensor straight to its final offset;
    every :data:`WRITEBACK_BYTES` written to a shard start its write-back to the disk, so that :meth:`finalize`'s
    fsync waits for the last few only."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self._meta = {"format": "pt", **(metadata or {})}
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd index, absolute offset, spec)
        self._fds: list[int] = []
        self._dirty: list[int] = []  # bytes written to each shard since its write-back was last started
        self._pending = {s.name for s in specs}
        self.shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self.total_bytes = sum(s.nbytes for s in specs)
        for index, (file, shard) in enumerate(zip(self.files, self.shards)):
            header: dict[str, object] = {"__metadata__": self._meta}
            offset = 0
            offsets = []
            for spec in shard:
                header[spec.name] = {"dtype": _TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                offsets.append(offset)
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
            fd = os.open(self.folder / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self._dirty.append(0)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            data_start = 8 + len(raw)
            os.ftruncate(fd, data_start + offset)
            for spec, off in zip(shard, offsets):
                self._where[spec.name] = (index, data_start + off, spec)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: expected {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        written = 0
        while written < len(view):  # pwrite may write less than asked for very large buffers
            written += os.pwrite(self._fds[index], view[written:], offset + written)
        self._pending.discard(name)
        self._dirty[index] += written
        if self._dirty[index] >= WRITEBACK_BYTES:
            self._dirty[index] = 0
            start_writeback(self._fds[index])

    def finalize(self) -> None:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors were never written, e.g. {sorted(self._pending)[:3]}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            weight_map = {spec.name: file for file, shard in zip(self.files, self.shards) for spec in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output_path(out: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``), or that lies inside an input or contains one."""
    out = Path(out)
    if out.parent.is_dir():
        recover_output(out)  # a run killed while replacing out: complete it first, so "exists" tells the truth
    for src in inputs:
        if _is_inside(out, src):
            raise OutputPathError(f"output {out} lies inside the input {src}")
        if _is_inside(src, out):
            raise OutputPathError(f"output {out} contains the input {src}; it would be deleted")
    if os.path.lexists(out) and not overwrite:
        raise OutputPathError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} exists and is not a folder")
    # the nearest folder that exists: the output's missing parents are created in it
    parent = Path(os.path.abspath(out)).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create the output {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create the output {out}: the folder {parent} is not writable "
                              f"(permission denied)")


def ensure_open_files(needed: int, what: str) -> None:
    """Make room for ``needed`` more open files: raise the soft open-file limit up to the hard one when it is too
    low (a merge of many experts keeps one descriptor per weight file), or refuse with one line naming the limit
    before anything is opened, rather than fail with ``EMFILE`` half-way."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to check
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    want = needed + in_use + 16  # a margin for the files opened meanwhile (configs, the memo, a log)
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if want > soft:
        error = StorageError(f"cannot open the {needed} files {what} needs: the open-file limit is {soft} (hard "
                             f"limit {hard}) and {in_use} are in use [EMFILE]; raise it (ulimit -n {want}) or "
                             f"merge fewer models at a time")
        error.errno = errno.EMFILE
        raise error


# Siblings of an output ``out`` that merges make, named ``.out.<kind>-<pid>-<hex>``: ``tmp`` (the new output being
# written; after the exchange, the old output being removed), ``old`` (the old output moved aside: journal fallback
# only) and ``swap`` (the journal of that fallback's two renames). The hex is 8 random digits and the host's tag.
_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|swap)-(?P<pid>\d+)-(?P<hex>[0-9a-f]+)$")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False when the system or the filesystem lacks the call or the
    flag (the caller falls back); any other failure raises OSError."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _remove(path: Path) -> None:
    """Remove a folder, or a file or symlink (never what a symlink points to)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _leftover(entry: Path, match: re.Match[str]) -> bool:
    """Whether a sibling was left by a run that is gone (its hex names the host after 8 digits of its own)."""
    tag = match.group("hex")
    return left_by_a_gone_process(entry, int(match.group("pid")), tag[8:] if len(tag) == 16 else None)


def _journal_target(parent: Path, out: Path, name: Any, kind: str) -> Path | None:
    """A sibling named in a journal, if it is one of this output's (a journal cannot point anywhere else)."""
    m = _SIBLING_RE.match(name) if isinstance(name, str) else None
    if m is None or m.group("name") != out.name or m.group("kind") != kind:
        return None
    return parent / name


def recover_output(out: Path) -> None:
    """Finish what killed runs left beside ``out`` (their process is gone), never losing a complete output.

    A journalled swap is completed: the new output, complete when its journal was written, goes into place (or the
    old one back, if the new is gone). An old output moved aside by a run killed before the new one was in place (an
    older mergeflow's two renames) is restored. Then the leftovers are removed: unfinished new outputs, and old
    copies once ``out`` is in place (an old copy is never removed while it may be the only one).
    """
    out = Path(out)
    parent = out.parent
    try:
        entries = [(m.group("kind"), parent / m.group(0)) for m in map(_SIBLING_RE.match, os.listdir(parent))
                   if m and m.group("name") == out.name and _leftover(parent / m.group(0), m)]
    except OSError:
        return
    for kind, journal in entries:
        if kind != "swap":
            continue
        try:
            data = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None  # torn before the first rename: nothing was moved
        if isinstance(data, dict) and not os.path.lexists(out):
            for name, role in ((data.get("new"), "tmp"), (data.get("old"), "old")):
                source = _journal_target(parent, out, name, role)
                if source is not None and os.path.lexists(source):
                    with contextlib.suppress(OSError):
                        _move_into_place(source, out)
                        break
        with contextlib.suppress(OSError):
            journal.unlink()
    if not os.path.lexists(out):
        for kind, old in entries:
            if kind == "old" and os.path.lexists(old):
                with contextlib.suppress(OSError):
                    _move_into_place(old, out)
                    break
    for kind, entry in entries:
        if (kind == "tmp" or (kind == "old" and os.path.lexists(out))) and os.path.lexists(entry):
            _remove(entry)


def _move_into_place(src: Path, out: Path) -> None:
    """Rename ``src`` to ``out`` only if nothing is there (FileExistsError otherwise)."""
    if _rename2(src, out, _RENAME_NOREPLACE):
        return
    if os.path.lexists(out):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
    os.rename(src, out)


def _swap_with_journal(tmp: Path, out: Path) -> bool:
    """Replace ``out`` with ``tmp`` in two renames, journalled so that a run killed between them is completed by the
    next (:func:`recover_output`) rather than leaving no output; for systems without ``RENAME_EXCHANGE``. False when
    another run put its own output in place between the two renames (``out`` is then complete: try again)."""
    tag = tmp.name.rsplit(".tmp-", 1)[1]
    old = out.parent / f".{out.name}.old-{tag}"
    journal = out.parent / f".{out.name}.swap-{tag}"
    try:
        with open(journal, "w", encoding="utf-8") as f:
            json.dump({"new": tmp.name, "old": old.name}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # disk full: nothing was moved yet
        with contextlib.suppress(OSError):
            journal.unlink()
        raise
    _fsync_dir(out.parent)
    try:
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.lexists(out):
                _remove(old)  # another run's complete output took the place: ours replaces it next
                return False
            with contextlib.suppress(OSError):
                os.rename(old, out)  # put the old output back
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, out)
            raise
    finally:
        if not os.path.lexists(old):
            with contextlib.suppress(OSError):
                journal.unlink()
    _remove(old)
    with contextlib.suppress(OSError):
        journal.unlink()
    return True


def _publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Put the complete folder ``tmp`` at ``out`` so that ``out`` is at every instant absent, the complete old output
    or the complete new one. Two runs landing on one output: with ``overwrite`` the last wins, without it the later
    one is refused with one line; neither leaves anything behind."""
    for _ in range(20):
        if not os.path.lexists(out):
            try:
                _move_into_place(tmp, out)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another run put its output there meanwhile
        if not overwrite:
            raise OutputPathError(f"output {out} appeared while merging (another run wrote it); not replacing it "
                                  f"(pass --overwrite to replace it)")
        if not out.is_symlink() and os.path.lexists(out) and not out.is_dir():
            raise OutputPathError(f"output {out} exists and is not a folder")
        try:
            # one atomic step: out becomes the new folder, tmp the old one (or the old symlink), then removed
            if _rename2(tmp, out, _RENAME_EXCHANGE):
                _remove(tmp)
                return
            if _swap_with_journal(tmp, out):
                return
        except FileNotFoundError:
            if not os.path.lexists(tmp):
                raise
            # out was removed meanwhile: put ours in place as a new output
    raise OutputPathError(f"output {out} kept changing while it was being replaced (other runs writing it?)")


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; put it in place only when the block completes.

    On any exception (or KeyboardInterrupt / SystemExit) the temporary folder is removed and an existing ``out`` is
    left untouched. With ``overwrite`` the new folder and the old are exchanged in one atomic ``renameat2`` step (Linux)
    and the old one removed after, so at every instant ``out`` is either the complete old or the complete new output;
    where the exchange is unavailable, two journalled renames that the next run completes if this one is killed. An
    output that is a symlink is replaced by the new folder; what it pointed to is left untouched.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "create the output", out) from exc
    recover_output(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}{HOST_TAG}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise storage_error(exc, "create the output", out) from exc
    try:
        yield tmp
        _publish(tmp, out, overwrite=overwrite)
    except BaseException:
        if os.path.lexists(tmp):
            _remove(tmp)
        raise
