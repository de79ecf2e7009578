"""Checkpoint resolution, content hashing, bad-input detection and the intermediate cache.

Everything runs offline against tiny real checkpoints in tmp folders; the hub path is exercised against a hand-built
Hugging Face cache with the exact layout huggingface_hub writes (blobs, snapshots/<commit> symlinks, refs/main).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow import checkpoints, resolvers
from mergeflow.cache import CODE_VERSION, COMPLETE_MARKER, Cache, cache_key
from mergeflow.checkpoints import Snapshot, content_hash, inspect_weights, load_pickle, resolve, scan_finite
from mergeflow.errors import CheckpointError, NonFiniteTensorError
from mergeflow.paths import mergeflow_home
from mergeflow.registry import Registry
from tests.tiny_models import make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private MERGEFLOW_HOME and HF cache, hub offline, and any socket connection is an error."""
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "mf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))

    def no_network(self: socket.socket, *args: object) -> None:
        raise AssertionError(f"test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny Llama checkpoint (config, model.safetensors, tokenizer); tests copy it before changing anything."""
    return make_model("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_hash(folder: Path, names: list[str]) -> str:
    """The documented formula, computed from scratch: sha256 over sorted "name\\0sha256(bytes)\\n" lines."""
    lines = "".join(f"{n}\0{file_sha(folder / n)}\n" for n in sorted(names))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    save_file(tensors, str(folder / name))
    return folder


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def set_mtime(path: Path, ns: int) -> None:
    # Explicit mtimes: a same-size rewrite within one timestamp tick would otherwise look unchanged to the memo.
    os.utime(path, ns=(ns, ns))


# -------------------------------------------------------------------------------------------------- local folder


def test_local_folder_relative_to_base_dir_and_cwd(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    models = tmp_path / "models"
    folder = copy_model(tiny, models / "base")

    snap = resolve("base", base_dir=models)
    assert snap == Snapshot(reference="base", path=folder.resolve(), weight_files=("model.safetensors",),
                            format="safetensors", revision=None,
                            content_hash=expected_hash(folder, ["model.safetensors"]))

    monkeypatch.chdir(models)
    assert resolve("base").path == folder.resolve()
    assert resolve(Path("base")).content_hash == snap.content_hash
    assert resolve(str(folder)).path == folder.resolve()  # absolute paths ignore base_dir
    assert resolve(str(folder), base_dir=tmp_path / "elsewhere").path == folder.resolve()


def test_nonexistent_local_path_says_no_such_folder(tmp_path: Path):
    for ref in ["./nope", str(tmp_path / "nope"), "a/b/c", "not a repo id"]:
        with pytest.raises(CheckpointError, match="no such folder"):
            resolve(ref, base_dir=tmp_path)


def test_revision_on_local_folder_is_refused(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    with pytest.raises(CheckpointError, match="local folder, which has no revision"):
        resolve(str(folder), revision="main")


def test_file_instead_of_folder(tiny: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        resolve(str(tiny / "config.json"))


# ------------------------------------------------------------------------------------------------- content hash


def test_hash_is_location_independent_and_tracks_bytes(tiny: Path, tmp_path: Path):
    a = copy_model(tiny, tmp_path / "a")
    b = copy_model(tiny, tmp_path / "deep" / "b")
    ha, hb = resolve(str(a)).content_hash, resolve(str(b)).content_hash
    assert ha == hb == expected_hash(a, ["model.safetensors"])

    # Change one weight value in b, keeping the file valid and its size the same.
    tensors = load_file(str(b / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    set_mtime(b / "model.safetensors", 1_000_000_000_123)
    changed = resolve(str(b)).content_hash
    assert changed != ha
    assert changed == expected_hash(b, ["model.safetensors"])

    # Non-weight files do not enter the hash.
    (a / "README.md").write_text("notes")
    assert resolve(str(a)).content_hash == ha


def test_hash_is_independent_of_listing_order(tmp_path: Path):
    folder = write_checkpoint(tmp_path / "m", {"x": torch.ones(3)}, name="b.safetensors")
    save_file({"y": torch.zeros(2)}, str(folder / "a.safetensors"))
    h1 = content_hash(folder, ["b.safetensors", "a.safetensors"])
    h2 = content_hash(folder, ("a.safetensors", "b.safetensors"))
    assert h1 == h2 == expected_hash(folder, ["a.safetensors", "b.safetensors"])
    # The names are part of the hash: the same bytes under another name hash differently.
    (folder / "b.safetensors").rename(folder / "c.safetensors")
    assert content_hash(folder, ["a.safetensors", "c.safetensors"]) != h1


def test_memo_hit_does_not_reread(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = copy_model(tiny, tmp_path / "m")
    hashed: list[Path] = []
    scanned: list[Path] = []
    real_sha, real_scan = checkpoints._sha256_file, checkpoints._scan_file
    monkeypatch.setattr(checkpoints, "_sha256_file", lambda p: hashed.append(p) or real_sha(p))
    monkeypatch.setattr(checkpoints, "_scan_file", lambda p: scanned.append(p) or real_scan(p))

    first = resolve(str(folder))
    assert (len(hashed), len(scanned)) == (1, 1)
    memo = json.loads((mergeflow_home() / "hashes.json").read_text())
    entry = memo["files"][str((folder / "model.safetensors").resolve())]
    assert entry["sha256"] == file_sha(folder / "model.safetensors")
    assert entry["finite"] is True
    assert entry["size"] == (folder / "model.safetensors").stat().st_size

    second = resolve(str(folder))
    assert second == first
    assert (len(hashed), len(scanned)) == (1, 1)  # memo hit: neither hashed nor scanned again

    set_mtime(folder / "model.safetensors", 2_000_000_000_000)  # touched: both verdicts are stale
    assert resolve(str(folder)).content_hash == first.content_hash
    assert (len(hashed), len(scanned)) == (2, 2)


def test_memo_survives_concurrent_writers(tmp_path: Path):
    folders = [write_checkpoint(tmp_path / f"m{i}", {"w": torch.full((4,), float(i))}) for i in range(8)]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = content_hash(folders[i], ["model.safetensors"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: expected_hash(folders[i], ["model.safetensors"]) for i in range(8)}
    memo = json.loads((mergeflow_home() / "hashes.json").read_text())  # still one valid JSON document
    assert memo["version"] == 1
    assert not list(mergeflow_home().glob(".hashes-*"))  # no temp files left behind


def test_damaged_memo_is_ignored(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    (mergeflow_home() / "hashes.json").write_text("{not json")
    assert resolve(str(folder)).content_hash == expected_hash(folder, ["model.safetensors"])
    assert json.loads((mergeflow_home() / "hashes.json").read_text())["version"] == 1


# ------------------------------------------------------------------------------------------------------ hub cache


def populate_hub_cache(cache: Path, repo_id: str, model: Path, commit: str = COMMIT) -> Path:
    """Lay out ``model`` in ``cache`` exactly as huggingface_hub does: content-addressed blobs, a snapshot folder of
    relative symlinks, and refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for src in sorted(model.iterdir()):
        blob = file_sha(src)
        shutil.copyfile(src, repo / "blobs" / blob)
        (snapshot / src.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_local_cache_offline(tiny: Path, tmp_path: Path):
    snapshot = populate_hub_cache(tmp_path / "hf_cache", "org/name", tiny)
    snap = resolve("org/name")
    assert snap.path == snapshot
    assert snap.revision == COMMIT
    assert snap.format == "safetensors"
    assert snap.weight_files == ("model.safetensors",)
    # Same bytes as the local folder, so the same content hash, wherever the files live.
    assert snap.content_hash == expected_hash(tiny, ["model.safetensors"])
    assert snap.content_hash == resolve(str(tiny)).content_hash

    assert resolve("org/name@main").path == snapshot
    assert resolve("org/name", revision=COMMIT).path == snapshot


def test_hub_id_not_in_cache_is_a_clear_error(tiny: Path, tmp_path: Path):
    populate_hub_cache(tmp_path / "hf_cache", "org/name", tiny)
    with pytest.raises(CheckpointError, match=r"cannot resolve 'org/other': not a local folder and not in the "
                                              r"Hugging Face cache \(offline"):
        resolve("org/other")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve("org/name@v2")  # no such ref cached
    with pytest.raises(CheckpointError, match="conflicts with revision"):
        resolve("org/name@main", revision="v2")


def test_hub_honours_hf_home_when_hub_cache_unset(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    snapshot = populate_hub_cache(tmp_path / "hf_home" / "hub", "org/name", tiny)
    assert resolve("org/name").path == snapshot


def test_local_folder_wins_over_hub_id(tiny: Path, tmp_path: Path):
    populate_hub_cache(tmp_path / "hf_cache", "org/name", tiny)
    local = write_checkpoint(tmp_path / "work" / "org" / "name", {"w": torch.ones(2)})
    assert resolve("org/name", base_dir=tmp_path / "work").path == local.resolve()


# ----------------------------------------------------------------------------------------------- corrupt files


def test_truncated_safetensors(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        resolve(str(folder))
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file"):
        resolve(str(folder))
    header_len = struct.unpack("<Q", data[:8])[0]
    weights.write_bytes(data[: 8 + header_len // 2])  # cut inside the header
    with pytest.raises(CheckpointError, match="does not fit"):
        resolve(str(folder))


def test_corrupt_header(tmp_path: Path):
    folder = write_checkpoint(tmp_path / "m", {"w": torch.ones(4)})
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 32) + b"\x9f\x00garbage{{{" + b"\x01" * 20 + b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file \(header is not valid"):
        resolve(str(folder))
    weights.write_bytes(bytes(range(256)) * 4)  # garbage throughout: the length prefix is absurd
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file \(header length"):
        resolve(str(folder))


def test_offsets_past_eof_and_inconsistent_entries(tmp_path: Path):
    folder = write_checkpoint(tmp_path / "m", {"w": torch.ones(4)})
    weights = folder / "model.safetensors"
    write_raw_safetensors(weights, {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"truncated safetensors file .*expected \d+; tensor data ends past"):
        resolve(str(folder))

    cases = {
        r"tensor 'w': shape \[4\] of F32 needs 16 bytes but data_offsets span 12":
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
        r"tensor 'w': unknown dtype 'F17'": {"w": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}},
        r"tensor 'b' starts at byte 4, expected 8: gap or overlap":
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        r"tensor 'w': bad shape \[-4\]": {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
    }
    for problem, header in cases.items():
        write_raw_safetensors(weights, header, b"\x00" * 16)
        with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file \(" + problem):
            inspect_weights(folder, ["model.safetensors"])

    write_raw_safetensors(weights, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 20)
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor"):
        inspect_weights(folder, ["model.safetensors"])
    write_raw_safetensors(weights, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 16)
    inspect_weights(folder, ["model.safetensors"])  # the well-formed twin passes


def test_header_checks_read_no_tensor_data(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A corrupt file is rejected from its header alone: hashing and tensor reads never start."""
    folder = copy_model(tiny, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1])
    monkeypatch.setattr(checkpoints, "_sha256_file", lambda p: pytest.fail("hashed a corrupt file"))
    monkeypatch.setattr(checkpoints, "_scan_file", lambda p: pytest.fail("scanned a corrupt file"))
    with pytest.raises(CheckpointError, match="truncated"):
        resolve(str(folder))


# --------------------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_are_refused(tmp_path: Path, dtype: torch.dtype):
    bad = torch.zeros(10, dtype=dtype)
    bad[1] = float("nan")
    bad[3] = float("nan")
    bad[7] = float("-inf")
    folder = write_checkpoint(tmp_path / "m", {"ok": torch.ones(3, dtype=dtype), "layer.bad": bad,
                                               "ids": torch.arange(4)})
    with pytest.raises(NonFiniteTensorError,
                       match=r"model\.safetensors: tensor 'layer\.bad' has 3 non-finite values \(2 NaN, 1 Inf\) of 10"):
        resolve(str(folder))
    # Opting out skips the scan (the header is fine), and the bad file is not memoised as finite.
    assert resolve(str(folder), scan_finite=False).format == "safetensors"
    with pytest.raises(NonFiniteTensorError):
        scan_finite(folder, ["model.safetensors"])


def test_inf_alone_and_float8(tmp_path: Path):
    folder = write_checkpoint(tmp_path / "m", {"w": torch.tensor([1.0, float("inf")])})
    with pytest.raises(NonFiniteTensorError, match=r"tensor 'w' has 1 non-finite values \(0 NaN, 1 Inf\) of 2"):
        scan_finite(folder, ["model.safetensors"])
    f8 = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
    folder8 = write_checkpoint(tmp_path / "m8", {"w8": f8})
    with pytest.raises(NonFiniteTensorError, match=r"tensor 'w8' has 1 non-finite values \(1 NaN, 0 Inf\)"):
        scan_finite(folder8, ["model.safetensors"])


# ---------------------------------------------------------------------------------------------------- pickle


class _Exploit:
    """Unpickling this (without weights_only) would create a folder: the canary for arbitrary code execution."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return os.makedirs, (str(self.canary),)


def test_pickle_refused_unless_allowed_then_loaded_weights_only(tmp_path: Path):
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    torch.save(state, folder / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match=r"holds only pickle \.bin weights; set allow_pickle: true in the "
                                              r"recipe to load them with torch\.load\(weights_only=True\)"):
        resolve(str(folder))
    snap = resolve(str(folder), allow_pickle=True)
    assert (snap.format, snap.weight_files) == ("pickle", ("pytorch_model.bin",))
    assert snap.content_hash == expected_hash(folder, ["pytorch_model.bin"])
    loaded = load_pickle(folder / "pytorch_model.bin")
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])

    # A pickle carrying code is refused by weights_only=True, and the code never runs.
    canary = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "x": _Exploit(canary)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused or unreadable pickle checkpoint"):
        resolve(str(folder), allow_pickle=True)
    assert not canary.exists()


def test_pickle_truncated_and_non_finite(tmp_path: Path):
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.tensor([1.0, float("nan")])}, folder / "pytorch_model.bin")
    with pytest.raises(NonFiniteTensorError, match=r"pytorch_model\.bin: tensor 'w' has 1 non-finite"):
        resolve(str(folder), allow_pickle=True)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt pickle checkpoint"):
        resolve(str(folder), allow_pickle=True)


def test_safetensors_preferred_over_pickle(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    torch.save({"w": torch.ones(1)}, folder / "pytorch_model.bin")
    snap = resolve(str(folder))  # no allow_pickle needed: the .bin is never touched
    assert (snap.format, snap.weight_files) == ("safetensors", ("model.safetensors",))


# ----------------------------------------------------------------------------------------- folder-level errors


def write_sharded(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 16}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_index_and_missing_shard(tmp_path: Path):
    folder = write_sharded(tmp_path / "sharded")
    snap = resolve(str(folder))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert snap.weight_files == tuple(shards)
    assert snap.content_hash == expected_hash(folder, shards)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors listed in "
                                              r"model\.safetensors\.index\.json is missing"):
        resolve(str(folder))


def test_index_cannot_point_outside_the_folder(tmp_path: Path):
    folder = write_sharded(tmp_path / "sharded")
    index = {"weight_map": {"a": "../../etc/passwd"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="invalid shard name"):
        resolve(str(folder))


def test_missing_config_empty_folder_and_no_weights(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        resolve(str(folder))

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is an empty folder"):
        resolve(str(tmp_path / "empty"))

    only_config = tmp_path / "cfg"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights"):
        resolve(str(only_config))

    (only_config / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        resolve(str(only_config))


def test_unreadable_weight_file(tiny: Path, tmp_path: Path):
    folder = copy_model(tiny, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.chmod(0)
    try:
        if os.access(weights, os.R_OK):
            pytest.skip("running with privileges that read a chmod-000 file (root)")
        with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
            resolve(str(folder))
    finally:
        weights.chmod(0o644)


def test_unreadable_folder_and_file_simulated(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The same paths as above, made to fail even as root by denying access at the OS call."""
    folder = copy_model(tiny, tmp_path / "m")
    real_listdir, real_access = os.listdir, os.access

    def deny_listdir(path: object) -> list[str]:
        if Path(str(path)) == folder.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", deny_listdir)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*Permission denied"):
        resolve(str(folder))
    monkeypatch.setattr(os, "listdir", real_listdir)

    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".safetensors") else real_access(p, mode))
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors: permission denied"):
        resolve(str(folder))


# ------------------------------------------------------------------------------------------------------ MLflow


def test_models_uri_without_mlflow(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    monkeypatch.delitem(sys.modules, "mergeflow.tracking", raising=False)  # so the models: resolver imports it again
    monkeypatch.setattr(resolvers, "RESOLVERS", Registry("reference scheme", resolvers.BUILTIN_RESOLVERS))
    with pytest.raises(CheckpointError, match="MLflow is not installed"):
        resolve("models:/tiny/1")


def test_models_uri_downloads_once_and_resolves_alias(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real SQLite MLflow store: the alias resolves to its version, which is downloaded once and then served
    from the cache (versions are immutable)."""
    import mlflow.artifacts

    from mergeflow import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    real_download = mlflow.artifacts.download_artifacts
    downloads: list[str] = []

    def counting_download(artifact_uri: str, dst_path: str) -> str:
        downloads.append(artifact_uri)
        return real_download(artifact_uri=artifact_uri, dst_path=dst_path)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting_download)
    try:
        registered = tracking.log_merge(tiny, recipe={"merge_method": "linear"}, recipe_hash="sha256:" + "0" * 64,
                                        input_hashes={}, experiment="checkpoints", registered_name="tiny",
                                        selection_metric=("validation_avg", 50.0))
        snap = resolve("models:/tiny@champion")
        assert downloads == [f"models:/tiny/{registered.version}"]
        assert snap.revision == registered.version
        assert snap.path.is_relative_to(mergeflow_home() / "cache")
        assert snap.content_hash == expected_hash(tiny, ["model.safetensors"])

        again = resolve(f"models:/tiny/{registered.version}")
        assert again.path == snap.path and len(downloads) == 1  # versions are immutable: cached
        with pytest.raises(CheckpointError, match="version must be a number"):
            resolve("models:/tiny/Production")
        with pytest.raises(CheckpointError, match="expected models:/<name>/<version>"):
            resolve("models:/")
    finally:
        mlflow.set_tracking_uri(None)  # MLflow also keeps the URI in a global: leave nothing behind
        mlflow.set_registry_uri(None)


# --------------------------------------------------------------------------------------------------- paths


def test_mergeflow_home_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MERGEFLOW_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    home = mergeflow_home()
    assert home == (tmp_path / "user" / ".cache" / "mergeflow").resolve() and home.is_dir()
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "custom"))
    assert mergeflow_home() == (tmp_path / "custom").resolve() and (tmp_path / "custom").is_dir()


# --------------------------------------------------------------------------------------------------- cache


def test_cache_key_golden_and_stable():
    expected_payload = {"kind": "coefficients", "code": CODE_VERSION,
                        "inputs": {"alpha": 0.1, "experts": ["sha256:aa", "sha256:bb"], "path": "/x/y", "seed": 3}}
    golden = hashlib.sha256(json.dumps(expected_payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    key = cache_key("coefficients", seed=3, alpha=0.1, path=Path("/x/y"), experts=("sha256:aa", "sha256:bb"))
    assert key == golden
    assert cache_key("coefficients", experts=["sha256:aa", "sha256:bb"], path="/x/y", alpha=0.1, seed=3) == key


def test_cache_key_sensitivity(monkeypatch: pytest.MonkeyPatch):
    import mergeflow.cache as cache_module

    base = cache_key("k", a=0.1)
    others = [
        cache_key("k", a=0.30000000000000004 - 0.2),  # 0.10000000000000003: floats hash repr-exact
        cache_key("k", a=1), cache_key("k", a=1.0), cache_key("k", a=True), cache_key("k", a="0.1"),
        cache_key("other", a=0.1), cache_key("k", b=0.1), cache_key("k", a=0.1, b=None),
        cache_key("k", a=[0.1]), cache_key("k", a=float("nan")),
    ]
    assert len({base, *others}) == len(others) + 1
    monkeypatch.setattr(cache_module, "CODE_VERSION", "9.9.9+format7")
    assert cache_key("k", a=0.1) != base  # a new code version never reuses old entries
    with pytest.raises(TypeError, match="cannot hash a value of type object"):
        cache_key("k", a=object())


def test_cache_put_get_atomic(tmp_path: Path):
    cache = Cache(tmp_path / "c")
    key = cache_key("tv", x=1)
    assert cache.get("tv", key) is None

    with pytest.raises(RuntimeError, match="boom"), cache.put("tv", key) as tmp:
        (tmp / "half.bin").write_bytes(b"1234")
        raise RuntimeError("boom")
    assert cache.get("tv", key) is None
    assert list((tmp_path / "c" / "tv").iterdir()) == []  # the temp folder is gone, nothing published

    with cache.put("tv", key) as tmp:
        assert cache.get("tv", key) is None  # not visible while being written
        (tmp / "data.json").write_text('{"v": 1}')
    entry = cache.get("tv", key)
    assert entry == tmp_path / "c" / "tv" / key == cache.path("tv", key)
    assert json.loads((entry / "data.json").read_text()) == {"v": 1}
    assert json.loads((entry / COMPLETE_MARKER).read_text())["code"] == CODE_VERSION
    assert [p.name for p in (tmp_path / "c" / "tv").iterdir()] == [key]


def test_cache_concurrent_writer_keeps_first(tmp_path: Path):
    cache = Cache(tmp_path / "c")
    key = cache_key("tv", x=2)
    with cache.put("tv", key) as slow:
        (slow / "who").write_text("slow")
        with cache.put("tv", key) as fast:  # another writer finishes first
            (fast / "who").write_text("fast")
    entry = cache.get("tv", key)
    assert entry is not None and (entry / "who").read_text() == "fast"
    assert [p.name for p in (tmp_path / "c" / "tv").iterdir()] == [key]


def test_cache_get_or_create_builds_once_and_default_root(tmp_path: Path):
    cache = Cache()
    assert cache.root == mergeflow_home() / "cache"
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "out.txt").write_text("built")

    key = cache_key("manifest", h="sha256:00")
    first = cache.get_or_create("manifest", key, build)
    second = cache.get_or_create("manifest", key, build)
    assert first == second and (first / "out.txt").read_text() == "built" and len(calls) == 1
    with pytest.raises(ValueError, match="invalid cache kind"):
        cache.path("../escape", key)
    with pytest.raises(ValueError, match="invalid cache key"):
        cache.path("manifest", "a/b")


# --------------------------------------------------------------------------------------------------- resolvers


def test_a_registered_scheme_resolves_through_its_resolver(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(resolvers.RESOLVERS, "mine", lambda ref: (tiny, "v7") if ref == "mine:tiny" else None)
    snap = resolve("mine:tiny")
    assert snap.path == tiny.resolve() and snap.revision == "v7" and snap.reference == "mine:tiny"
    with pytest.raises(CheckpointError, match="'revision' applies to hub ids; a mine: reference names its version"):
        resolve("mine:tiny", revision="main")


def test_an_unregistered_scheme_is_a_folder_name(tiny: Path, tmp_path: Path):
    folder = tmp_path / "odd:name"
    shutil.copytree(tiny, folder)
    assert resolve("odd:name", base_dir=tmp_path).path == folder.resolve()


def test_zoo_errors_are_reported_as_checkpoint_errors():
    # a bad zoo reference fails in the zoo's own parser, before anything is built
    with pytest.raises(CheckpointError, match=r"cannot resolve 'zoo:nosuchsize/base': .*unknown size"):
        resolve("zoo:nosuchsize/base")


def test_the_checkpoint_reader_imports_neither_tracking_nor_the_zoo():
    code = ("import sys, mergeflow.checkpoints; "
            "print(sorted(m for m in sys.modules if m.startswith(('mergeflow.tracking', 'mergeflow.zoo', 'mlflow'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
