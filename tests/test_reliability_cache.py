"""Issue 15, case 4: no damaged cache is served.

Every cache entry records the size and sha256 of its files (and of the blocks of large ones) and is checked when it
is reused: an edited task-vector manifest, a bit flipped in a cached merged model, a manifest truncated or deleted
are found, the entry is removed with a warning and built again, and the result is what a fresh build gives.
Temporary folders of killed builds are removed. The checkpoint hash memo notices a file rewritten in place with its
size and mtime kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergeflow import cache as cache_module
from mergeflow import paths, pipeline
from mergeflow.cache import COMPLETE_MARKER, VERIFY_ENV, Cache, cache_key
from mergeflow.checkpoints import resolve
from mergeflow.cli import main
from mergeflow.engine import MergeOptions, merge
from mergeflow.errors import NonFiniteTensorError
from mergeflow.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = MergeOptions(progress=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A MERGEFLOW_HOME of the test's own: its cache and memo start empty."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MERGEFLOW_HOME", str(folder))
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    return folder


def _ties(tmp_path: Path, base: Path, experts: list[Path]) -> Path:
    """TIES trims globally by default: each expert's task-vector manifest (with its thresholds) is cached."""
    path = tmp_path / "ties.yaml"
    path.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                    + "".join(f"  - model: {e}\n    parameters: {{weight: 0.5, density: 0.4}}\n" for e in experts))
    return path


def _manifests(home: Path) -> list[Path]:
    return sorted((home / "cache" / "task_vector").glob("*/task_vector.json"))


def _damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


# ------------------------------------------------------------------------------------ task-vector manifests


def _content(manifest: Path) -> dict:
    """A manifest but for the time its build took."""
    return {k: v for k, v in json.loads(manifest.read_text()).items() if k != "seconds"}


def _edit_thresholds(path: Path) -> None:
    data = json.loads(path.read_text())
    data["thresholds"] = {d: t * 3 for d, t in data["thresholds"].items()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_edit_thresholds, _truncate, Path.unlink], ids=["edited", "truncated",
                                                                                     "deleted"])
def test_damaged_task_vector_manifest_is_rebuilt_with_a_warning(families, tmp_path: Path, home: Path, caplog,
                                                                damage) -> None:
    base, experts = families("llama")
    recipe = load_recipe(_ties(tmp_path, base, experts[:2]))
    first = merge(recipe, tmp_path / "first", options=QUIET)
    manifests = _manifests(home)
    assert len(manifests) == 2
    original = _content(manifests[0])
    damage(manifests[0])
    with caplog.at_level(logging.WARNING, logger="mergeflow.cache"):
        second = merge(recipe, tmp_path / "second", options=QUIET)
    warned = _damage_warnings(caplog)
    assert len(warned) == 1 and "task_vector/" in warned[0] and "task_vector.json" in warned[0], warned
    assert _content(manifests[0]) == original  # built again, as it was
    assert second.thresholds == first.thresholds
    assert load_file(tmp_path / "second" / "model.safetensors").keys() == load_file(
        tmp_path / "first" / "model.safetensors").keys()
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == (
        tmp_path / "first" / "model.safetensors").read_bytes()
    assert not [p for p in manifests[0].parent.parent.iterdir() if p.name.startswith(".tmp-")]


def test_damage_is_a_warning_on_the_command_line_not_a_traceback(families, tmp_path: Path, home: Path) -> None:
    base, experts = families("llama")
    recipe = _ties(tmp_path, base, experts[:2])
    env = {**os.environ, "MERGEFLOW_HOME": str(home)}
    command = [sys.executable, "-m", "mergeflow.cli", "merge", str(recipe)]
    assert subprocess.run([*command, str(tmp_path / "a"), "--no-progress"], env=env, timeout=300).returncode == 0
    _manifests(home)[0].write_text("{")  # truncated mid-write by a crash of some other tool
    done = subprocess.run([*command, str(tmp_path / "b"), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "is damaged" in done.stderr and "built again" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_entry_of_an_older_version_that_cannot_be_read_is_rebuilt(families, tmp_path: Path, home: Path,
                                                                  caplog) -> None:
    """An entry made before content records is trusted once (its record is made on first reuse); a manifest in it
    that cannot be read is still built again rather than failing every later merge."""
    base, experts = families("llama")
    recipe = load_recipe(_ties(tmp_path, base, experts[:2]))
    merge(recipe, tmp_path / "first", options=QUIET)
    manifest = _manifests(home)[0]
    marker = manifest.parent / COMPLETE_MARKER
    legacy = json.loads(marker.read_text())
    del legacy["files"]
    marker.write_text(json.dumps(legacy))
    _truncate(manifest)
    with caplog.at_level(logging.WARNING, logger="mergeflow.cache"):
        merge(recipe, tmp_path / "second", options=QUIET)
    assert any("cannot be read" in w for w in _damage_warnings(caplog)), caplog.text
    assert json.loads(manifest.read_text())["thresholds"]
    assert "files" in json.loads(marker.read_text())


# ------------------------------------------------------------------------------------------ merged models


def _flip_a_bit(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # in the tensor data (the header is at the start): still a valid file
    path.write_bytes(bytes(data))


def test_bit_flip_in_a_cached_merged_model_is_rebuilt(families, tmp_path: Path, home: Path, caplog) -> None:
    base, experts = families("llama")
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts[:2]]})
    resolved_base = pipeline.resolve_stage(str(base))
    resolved = [pipeline.resolve_stage(str(e)) for e in experts[:2]]
    first = pipeline.merge_stage(recipe, resolved_base, resolved)
    weights = Path(first.path) / "model.safetensors"
    original = weights.read_bytes()
    _flip_a_bit(weights)
    with caplog.at_level(logging.WARNING, logger="mergeflow.cache"):
        again = pipeline.merge_stage(recipe, resolved_base, resolved)
    assert not again.reused and again.path == first.path
    assert any("model/model.safetensors" in w for w in _damage_warnings(caplog)), caplog.text
    assert weights.read_bytes() == original and again.content_hash == first.content_hash
    assert pipeline.merge_stage(recipe, resolved_base, resolved).reused  # intact now: reused


# ------------------------------------------------------------------------------------ large files, sampled


@pytest.fixture
def small_blocks(monkeypatch) -> None:
    """Make a 40 KB file "large": 40 blocks of 1 KB, two checked per reuse (the first and the last)."""
    monkeypatch.setattr(cache_module, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(cache_module, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(cache_module, "SAMPLED_BLOCKS", 0)


def _large_entry(tmp_path: Path) -> tuple[Cache, str, Path]:
    store = Cache(tmp_path / "c")
    key = cache_key("blob", n=1)
    entry = store.get_or_create("blob", key, lambda folder: (folder / "big.bin").write_bytes(os.urandom(40 * 1024)))
    return store, key, entry / "big.bin"


def test_large_files_are_checked_by_size_and_sampled_blocks(tmp_path: Path, small_blocks, monkeypatch,
                                                            caplog) -> None:
    store, key, big = _large_entry(tmp_path)
    record = json.loads((big.parent / COMPLETE_MARKER).read_text())["files"]["big.bin"]
    assert record["size"] == 40 * 1024 and len(record["blocks"]) == 40
    _flip_a_bit(big, 40 * 1024 - 10)  # in the first block: always sampled
    with caplog.at_level(logging.WARNING, logger="mergeflow.cache"):
        assert store.get("blob", key) is None
    assert any("block 0 of 40" in w for w in _damage_warnings(caplog))
    store, key, big = _large_entry(tmp_path)
    with big.open("ab") as f:  # one byte longer: the size is always checked
        f.write(b"\0")
    assert store.get("blob", key) is None


def test_verify_cache_hashes_large_files_in_full(tmp_path: Path, small_blocks, monkeypatch) -> None:
    store, key, big = _large_entry(tmp_path)
    _flip_a_bit(big, 20 * 1024)  # block 20: not among the sampled blocks here
    assert store.get("blob", key) == big.parent  # the trade-off of sampling: not seen...
    monkeypatch.setenv(VERIFY_ENV, "full")
    assert store.get("blob", key) is None  # ...and seen in full
    assert not big.parent.exists()


def test_verify_cache_flag_sets_full_verification_for_the_run(monkeypatch) -> None:
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    assert CliRunner().invoke(main, ["--verify-cache", "methods", "linear"]).exit_code == 0
    assert os.environ[VERIFY_ENV] == "full" and cache_module.full_verification()


# ------------------------------------------------------------------------------------ stale temporary folders


def test_temporary_folders_of_killed_builds_are_removed(tmp_path: Path, monkeypatch) -> None:
    store = Cache(tmp_path / "c")
    kind_folder = tmp_path / "c" / "tv"
    kind_folder.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, me, host = int(gone.stdout), os.getpid(), paths.HOST_TAG
    stale = [f".tmp-aaaa-{dead}-0123abcd",  # a killed build of an older version (no host tag)
             f".tmp-bbbb-{dead}-0123abcd{host}",  # a killed build on this host
             f".tmp-cccc-{me}-0123abcd{host}"]  # made before this process started, by one that had its pid
    kept = [f".tmp-dddd-{dead}-0123abcdfeedf00d",  # another host's build: its processes are not ours to judge
            f".tmp-eeee-{me}-4567abcd{host}"]  # this process's own build, in progress
    for name in [*stale, *kept]:
        (kind_folder / name).mkdir()
        (kind_folder / name / "part.bin").write_bytes(b"x" * 1000)
        time.sleep(0.05)
    # this process "started" just after the .tmp-cccc folder was made (as after a container restart that reused
    # the pid) and before its own .tmp-eeee folder
    started = os.lstat(kind_folder / kept[1]).st_ctime + 2.0 - 0.01  # the sweep allows 2 s of clock slack
    real_start = paths.process_start_time
    monkeypatch.setattr(paths, "process_start_time", lambda pid: started if pid == me else real_start(pid))
    store.get_or_create("tv", cache_key("tv", x=1), lambda folder: (folder / "a.txt").write_text("a"))
    left = sorted(p.name for p in kind_folder.iterdir() if p.name.startswith(".tmp-"))
    assert left == sorted(kept), left


# ------------------------------------------------------------------------------------ the checkpoint memo


def test_rewrite_with_size_and_mtime_kept_is_noticed(families, tmp_path: Path, home: Path) -> None:
    _, experts = families("llama")
    model = tmp_path / "expert"
    shutil.copytree(experts[0], model)
    before = resolve(model)  # hashed and scanned: memoised
    weights = model / "model.safetensors"
    st = weights.stat()
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("down_proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync -a does: the old mtime is put back
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(NonFiniteTensorError, match=name):
        resolve(model)
    assert resolve(model, scan_finite=False).content_hash != before.content_hash
    assert torch.isnan(load_file(weights)[name]).any()
