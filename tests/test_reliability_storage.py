"""Issue 15, cases 5 and 6: what the operating system refuses ends in one line, and ``--overwrite`` never leaves a
moment without a complete output.

5. disk full (at the output or in ``MERGEFLOW_HOME``), an output whose parent is a file, a missing parent under a
   read-only folder, too many open files: one ``error:`` line naming the path and the cause, exit code 2, no
   traceback, nothing left behind and a previous output unchanged; an expert holding float8 tensors is merged (upcast
   for compute) by ``merge`` as ``check`` promised;
6. ``--overwrite`` swaps the new output in (one atomic exchange where the kernel has it, else a journal that the
   next run completes): a run killed at any step leaves a complete output, old or new.

A full disk cannot be made without root (a tiny tmpfs), so ENOSPC is simulated at the low-level write call; the
other errors are real.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow import streaming, tensors
from mergeflow.engine import MergeOptions, merge
from mergeflow.errors import StorageError
from mergeflow.recipe import load_recipe
from tests.cli_helpers import cli as _cli
from tests.cli_helpers import keep_sigterm  # noqa: F401  (an autouse fixture)
from tests.cli_helpers import refused as _refused

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = MergeOptions(progress=False)


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.is_dir() else []


def _no_output(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    assert not _leftovers(out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _recipe(folder: Path, base: Path, experts: list[Path], *, method: str = "task_arithmetic", params: str = "",
            name: str = "r.yaml", extra: str = "") -> Path:
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {e}\n" + (f"    parameters: {{{params}}}\n" if params else "") for e in experts)
            + extra)
    path = folder / name
    path.write_text(text)
    return path


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------ 5. disk full


def test_disk_full_while_writing_shards_is_one_line_and_keeps_the_previous_output(families, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    base, experts = families("llama")
    out = tmp_path / "out"
    merge(load_recipe(_recipe(tmp_path, base, experts[:2])), out, options=QUIET)
    before = _snapshot(out)
    changed = _recipe(tmp_path, base, experts[:2], params="weight: 0.3", name="changed.yaml")
    monkeypatch.setattr(os, "pwrite", _enospc)  # every tensor's bytes go to their shard with os.pwrite
    _refused(_cli("merge", str(changed), str(out), "--overwrite", "--no-progress"),
             f"cannot write the output {out}", "No space left on device [ENOSPC]", "free space")
    assert _snapshot(out) == before
    assert not _leftovers(out)
    fresh = tmp_path / "fresh"
    _refused(_cli("merge", str(changed), str(fresh), "--no-progress"), f"{fresh}", "[ENOSPC]")
    _no_output(fresh)


def test_disk_full_names_the_output_file_not_the_temporary_folder(families, tmp_path: Path, monkeypatch) -> None:
    base, experts = families("llama")
    out = tmp_path / "out"

    def full_copy(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(streaming.shutil, "copy2", full_copy)  # the config and tokenizer copies
    line = _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
                    f"cannot write the output {out} (at {out / 'config.json'})", "[ENOSPC]")
    assert ".tmp-" not in line
    _no_output(out)
    # the library raises the same error, which is still an OSError carrying the errno
    with pytest.raises(StorageError) as caught:
        merge(load_recipe(tmp_path / "r.yaml"), out, options=QUIET)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC


def test_a_source_file_that_cannot_be_read_is_named_as_read_not_written(families, tmp_path: Path,
                                                                       monkeypatch) -> None:
    base, experts = families("llama")
    out = tmp_path / "out"

    def unreadable(src, dst, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))

    monkeypatch.setattr(streaming.shutil, "copy2", unreadable)
    _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
             f"cannot read {base.resolve() / 'config.json'}: Permission denied [EACCES]")
    _no_output(out)


def test_a_cache_build_failing_to_read_its_inputs_keeps_its_own_error(tmp_path: Path) -> None:
    """Only writes into the entry are the cache's errors; a build's own OSError (an input gone) is left as it is."""
    from mergeflow.cache import Cache, cache_key

    store = Cache(tmp_path / "c")

    def build(folder: Path) -> None:
        (tmp_path / "input.jsonl").read_text()

    with pytest.raises(FileNotFoundError) as caught:
        store.get_or_create("k", cache_key("k", x=1), build)
    assert not isinstance(caught.value, StorageError)
    assert list((tmp_path / "c" / "k").iterdir()) == []


def test_disk_full_in_mergeflow_home_is_one_line_and_leaves_no_partial_entry(families, tmp_path: Path,
                                                                              monkeypatch) -> None:
    base, experts = families("llama")
    home = tmp_path / "home"
    monkeypatch.setenv("MERGEFLOW_HOME", str(home))
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.is_relative_to(home / "cache"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    # TIES trims globally by default: the experts' task-vector manifests are cached in MERGEFLOW_HOME first
    recipe = _recipe(tmp_path, base, experts[:2], method="ties", params="weight: 0.5, density: 0.5")
    out = tmp_path / "out"
    _refused(_cli("merge", str(recipe), str(out), "--no-progress"),
             f"cannot write the cache entry {home / 'cache' / 'task_vector'}", "[ENOSPC]")
    _no_output(out)
    assert not [p for p in (home / "cache" / "task_vector").iterdir()]  # no entry, no .tmp-* folder
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert _cli("merge", str(recipe), str(out), "--no-progress").exit_code == 0  # space freed: it merges


def test_mergeflow_home_under_a_file_is_one_line(families, tmp_path: Path, monkeypatch) -> None:
    base, experts = families("llama")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MERGEFLOW_HOME", str(blocker / "home"))
    out = tmp_path / "out"
    _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
             f"cannot create MERGEFLOW_HOME {blocker / 'home'}")
    _no_output(out)


def test_an_os_error_no_layer_named_is_still_one_line(families, tmp_path: Path, monkeypatch) -> None:
    """The CLI's last resort: an environment's OSError raised where no layer translated it prints one line (the
    traceback with --debug); an OSError that is not the environment's (no errno) keeps its traceback, as a bug."""
    base, experts = families("llama")
    recipe = str(_recipe(tmp_path, base, experts[:2]))

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "disk"))

    monkeypatch.setattr("mergeflow.engine.merge", failing)
    _refused(_cli("merge", recipe, str(tmp_path / "out"), "--no-progress"),
             f"cannot access {tmp_path / 'disk'}: Input/output error [EIO]")
    debug = _cli("--debug", "merge", recipe, str(tmp_path / "out"), "--no-progress")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr
    monkeypatch.setattr("mergeflow.engine.merge", lambda *a, **k: (_ for _ in ()).throw(OSError("a bug")))
    bug = _cli("merge", recipe, str(tmp_path / "out"), "--no-progress")
    assert bug.exit_code == 1 and isinstance(bug.exception, OSError) and str(bug.exception) == "a bug"


# --------------------------------------------------------------------------------- 5. where the output goes


@pytest.mark.parametrize("below", ["out", "a/b/out"])
def test_output_under_a_file_is_one_line(families, tmp_path: Path, below: str) -> None:
    base, experts = families("llama")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / below
    _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
             f"cannot create the output {out}", f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "r.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the refusal cannot be observed "
                                              "(test_mkdir_refused_by_the_os_is_one_line covers the OS error)")
def test_missing_parent_under_a_read_only_folder_is_one_line(families, tmp_path: Path) -> None:
    base, experts = families("llama")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "missing" / "out"
        _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
                 f"cannot create the output {out}", f"the folder {locked} is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_mkdir_refused_by_the_os_is_one_line(families, tmp_path: Path, monkeypatch) -> None:
    """The folder check passed (or the folder changed since): the OS refusal itself is still one line."""
    base, experts = families("llama")
    out = tmp_path / "locked" / "missing" / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "locked"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    _refused(_cli("merge", str(_recipe(tmp_path, base, experts[:2])), str(out), "--no-progress"),
             f"cannot create the output {out}", "Permission denied [EACCES]")
    assert not (tmp_path / "locked").exists()


# ------------------------------------------------------------------------------------------ 5. open files


def _merge_with_file_limit(recipe: Path, out: Path, soft: int, hard: int) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.run([sys.executable, "-m", "mergeflow.cli", "merge", str(recipe), str(out), "--no-progress"],
                          preexec_fn=limit, capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def test_too_many_open_files_is_refused_up_front_or_the_soft_limit_raised(families, tmp_path: Path) -> None:
    base, experts = families("llama")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for this test")
    # 100 experts keep 101 weight files open: more than a soft limit of 64
    recipe = _recipe(tmp_path, base, [experts[i % 3] for i in range(100)])
    out = tmp_path / "out"
    refused = _merge_with_file_limit(recipe, out, 64, 64)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the 101 files"), refused.stderr
    assert "the open-file limit is 64 (hard limit 64)" in lines[0] and "[EMFILE]" in lines[0]
    assert "ulimit -n" in lines[0]
    _no_output(out)
    # the same merge with room under the hard limit: the soft limit is raised and it merges
    done = _merge_with_file_limit(recipe, out, 64, 256)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ 5. float8 inputs


def _float8_expert(expert: Path, dest: Path, *, upcast: bool) -> tuple[Path, str]:
    """A copy of ``expert`` whose first MLP weight is stored as float8 (or as the float32 upcast of that float8)."""
    shutil.copytree(expert, dest)
    weights = load_file(dest / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    f8 = weights[name].to(torch.float8_e4m3fn)
    weights[name] = f8.float() if upcast else f8
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest, name


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8 types")
@pytest.mark.parametrize("method, params, compat", [
    ("ties", "weight: 0.5, density: 0.5", False),  # a kernel that streams its raw inputs
    ("ties", "weight: 0.5, density: 0.5", True),  # mergekit_compat promotes the inputs' dtypes
    ("linear", "weight: 0.5", False),
])
def test_float8_expert_is_merged_as_its_float32_upcast(families, tmp_path: Path, method: str, params: str,
                                                       compat: bool) -> None:
    base, experts = families("llama")
    f8, name = _float8_expert(experts[0], tmp_path / "f8", upcast=False)
    up, _ = _float8_expert(experts[0], tmp_path / "up", upcast=True)
    extra = "mergekit_compat: true\n" if compat else ""
    recipe = _recipe(tmp_path, base, [f8, experts[1]], method=method, params=params, extra=extra)
    checked = _cli("check", str(recipe))
    assert checked.exit_code == 0 and "compatible" in checked.stdout, checked.output
    out = tmp_path / "out"
    done = _cli("merge", str(recipe), str(out), "--no-progress")
    assert done.exit_code == 0, (done.output, done.exception)
    reference = _recipe(tmp_path, base, [up, experts[1]], method=method, params=params, extra=extra, name="up.yaml")
    merge(load_recipe(reference), tmp_path / "ref", options=QUIET)
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key
    assert got[name].dtype == torch.float32  # the base's dtype, as for any other input dtype
    assert json.loads((out / "mergeflow.json").read_text())["method"] == method


# ------------------------------------------------------------------------------------------ 6. --overwrite


@pytest.fixture(params=["exchange", "journal"])
def swap(request, monkeypatch) -> str:
    """Both ways of replacing an output: renameat2's RENAME_EXCHANGE, and the journalled two renames used where the
    system or filesystem has no exchange."""
    if request.param == "exchange" and tensors._renameat2 is None:
        pytest.skip("this system has no renameat2")
    if request.param == "journal":
        monkeypatch.setattr(tensors, "_renameat2", None)
    return request.param


def _weights(folder: Path) -> dict[str, bytes]:
    """What a merge's content is (mergeflow.json and the model card also record the run's duration)."""
    return {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}


def _two_outputs(families, tmp_path: Path) -> tuple[Path, Path, Path]:
    """An old output at ``out`` and a recipe whose merge differs from it."""
    base, experts = families("llama")
    out = tmp_path / "out"
    merge(load_recipe(_recipe(tmp_path, base, experts[:2], params="weight: 0.2", name="old.yaml")), out,
          options=QUIET)
    new = _recipe(tmp_path, base, experts[:2], params="weight: 0.7", name="new.yaml")
    return out, tmp_path / "old.yaml", new


# a merge --overwrite that SIGKILLs itself at one step of putting its output in place (the step: MF_KILL_AT)
_KILLED_MERGE = """
import os, signal, sys
from pathlib import Path
import mergeflow.tensors as t
out, at = os.environ["MF_KILL_OUT"], os.environ["MF_KILL_AT"]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if at == "after_exchange":  # out is the new folder; the old one is still beside it
    real_remove = t._remove
    def remove(path):
        if Path(path).name.startswith(".out.tmp-"):
            die()
        real_remove(path)
    t._remove = remove
else:  # between the journalled renames: out moved aside, the new folder not yet in place
    t._renameat2 = None
    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if str(src) == out:
            die()
    os.rename = rename
from mergeflow.cli import main
sys.exit(main())
"""


def _killed_merge(recipe: Path, out: Path, at: str) -> None:
    env = {**os.environ, "MF_KILL_OUT": str(out), "MF_KILL_AT": at}
    done = subprocess.run([sys.executable, "-c", _KILLED_MERGE, "merge", str(recipe), str(out), "--overwrite",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)


@pytest.mark.skipif(tensors._renameat2 is None, reason="this system has no renameat2")
def test_overwrite_killed_after_the_exchange_leaves_the_new_output(families, tmp_path: Path) -> None:
    out, _, new = _two_outputs(families, tmp_path)
    expected = tmp_path / "expected"
    merge(load_recipe(new), expected, options=QUIET)
    _killed_merge(new, out, "after_exchange")
    assert _weights(out) == _weights(expected)  # complete and new: the exchange was one step
    assert _leftovers(out)  # the old copy the killed run did not get to remove...
    _refused(_cli("merge", str(new), str(out), "--no-progress"), "already exists")
    assert not _leftovers(out)  # ...is removed by the next run, which has the output to keep
    assert _weights(out) == _weights(expected)


def test_overwrite_killed_between_journalled_renames_is_completed_by_the_next_run(families, tmp_path: Path) -> None:
    out, _, new = _two_outputs(families, tmp_path)
    expected = tmp_path / "expected"
    merge(load_recipe(new), expected, options=QUIET)
    _killed_merge(new, out, "between_renames")
    assert not out.exists()  # the moment the journal is for
    kinds = sorted(p.name.split(".")[2].split("-")[0] for p in _leftovers(out))
    assert kinds == ["old", "swap", "tmp"], kinds
    # the next run completes the swap (the new output was complete) instead of deleting both copies
    _refused(_cli("merge", str(new), str(out), "--no-progress"), "already exists")
    assert _weights(out) == _weights(expected)
    assert not _leftovers(out)


def test_output_moved_aside_by_an_older_run_is_restored_not_deleted(families, tmp_path: Path) -> None:
    out, old_recipe, _ = _two_outputs(families, tmp_path)
    before = _snapshot(out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has exited
    os.rename(out, tmp_path / f".out.old-{dead}-0123abcd")  # what a run of the two plain renames killed left
    (tmp_path / f".out.tmp-{dead}-0123abcd").mkdir()
    ((tmp_path / f".out.tmp-{dead}-0123abcd") / "model.safetensors").write_bytes(b"partial")
    _refused(_cli("merge", str(old_recipe), str(out), "--no-progress"), "already exists")
    assert _snapshot(out) == before
    assert not _leftovers(out)


def test_symlinked_output_is_replaced_without_leftovers(families, tmp_path: Path, swap: str) -> None:
    out, _, new = _two_outputs(families, tmp_path)
    target = tmp_path / "target"
    os.rename(out, target)
    before = _snapshot(target)
    out.symlink_to(target)
    result = _cli("merge", str(new), str(out), "--overwrite", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.is_dir() and not out.is_symlink()  # the link is replaced by the new folder...
    assert _snapshot(target) == before  # ...and what it pointed to is left as it was
    assert not _leftovers(out)


@pytest.mark.parametrize("outer_overwrites", [True, False])
def test_two_runs_landing_on_one_output(families, tmp_path: Path, monkeypatch, swap: str,
                                        outer_overwrites: bool) -> None:
    """A run finishes its output while another is writing the same one: with --overwrite the later wins, without it
    the later is refused with one line; never a failed rename, never a folder left behind."""
    base, experts = families("llama")
    out = tmp_path / "out"
    inner = _recipe(tmp_path, base, experts[:2], params="weight: 0.2", name="inner.yaml")
    outer = _recipe(tmp_path, base, experts[:2], params="weight: 0.7", name="outer.yaml")
    expected = {}
    for name, recipe in (("inner", inner), ("outer", outer)):
        merge(load_recipe(recipe), tmp_path / name, options=QUIET)
        expected[name] = _weights(tmp_path / name)
    real_finalize = tensors.ShardedWriter.finalize
    ran = []

    def finalize(self) -> None:
        real_finalize(self)
        if not ran:  # the outer run's shards are written: the inner run lands on the output now
            ran.append(True)
            merge(load_recipe(inner), out, options=MergeOptions(progress=False, overwrite=True))

    monkeypatch.setattr(tensors.ShardedWriter, "finalize", finalize)
    args = ["merge", str(outer), str(out), "--no-progress"] + (["--overwrite"] if outer_overwrites else [])
    result = _cli(*args)
    if outer_overwrites:
        assert result.exit_code == 0, (result.output, result.exception)
        assert _weights(out) == expected["outer"]
    else:
        _refused(result, f"output {out} appeared while merging")
        assert _weights(out) == expected["inner"]
    assert ran and not _leftovers(out)


def test_a_run_landing_in_the_middle_of_a_replace(families, tmp_path: Path, monkeypatch, swap: str) -> None:
    """Another --overwrite run puts its output in place at the worst moment of this one's replace (just before the
    exchange; between the journalled renames, where the old code failed with Errno 39 and left both copies): this
    run still ends with its complete output in place and nothing beside it."""
    out, _, new = _two_outputs(families, tmp_path)
    base, experts = families("llama")
    other = _recipe(tmp_path, base, experts[:2], params="weight: 0.4", name="other.yaml")
    expected = tmp_path / "expected"
    merge(load_recipe(new), expected, options=QUIET)
    landed = []

    def land() -> None:
        if not landed:
            landed.append(True)
            merge(load_recipe(other), out, options=MergeOptions(progress=False, overwrite=True))

    if swap == "exchange":
        real_rename2 = tensors._rename2

        def rename2(src, dst, flags):
            if flags == tensors._RENAME_EXCHANGE:
                land()
            return real_rename2(src, dst, flags)

        monkeypatch.setattr(tensors, "_rename2", rename2)
    else:
        for fn in ("rename", "replace"):
            real = getattr(os, fn)

            def moved(src, dst, *args, _real=real, **kwargs):
                _real(src, dst, *args, **kwargs)
                if str(src) == str(out):  # this run moved the old output aside
                    land()

            monkeypatch.setattr(os, fn, moved)
    result = _cli("merge", str(new), str(out), "--overwrite", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    assert landed and _weights(out) == _weights(expected)
    assert not _leftovers(out)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the journal's descriptor")
def test_disk_full_writing_the_journal_keeps_the_old_output(families, tmp_path: Path, monkeypatch) -> None:
    out, _, new = _two_outputs(families, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(tensors, "_renameat2", None)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".swap-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _refused(_cli("merge", str(new), str(out), "--overwrite", "--no-progress"), f"cannot write the output {out}",
             "[ENOSPC]")
    assert _snapshot(out) == before
    assert not _leftovers(out)


def test_the_writer_starts_write_back_as_it_goes_and_writes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """Every WRITEBACK_BYTES written to a shard start its write-back (sync_file_range, which does not wait), so the
    final fsync does not wait for the whole output; the files are byte for byte what safetensors writes."""
    if sys.platform.startswith("linux"):
        fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x" * 4096)
            assert tensors.start_writeback(fd)  # the real call, on this filesystem
        finally:
            os.close(fd)
    started: list[int] = []
    real = tensors.start_writeback
    monkeypatch.setattr(tensors, "start_writeback", lambda fd: started.append(fd) or real(fd))
    monkeypatch.setattr(tensors, "WRITEBACK_BYTES", 1 << 20)
    weights = {f"w{i}": torch.randn(256, 512, generator=torch.Generator().manual_seed(i)) for i in range(6)}  # 512 KiB each
    specs = [tensors.TensorSpec(name, tuple(t.shape), t.dtype) for name, t in weights.items()]
    out = tmp_path / "out"
    out.mkdir()
    writer = tensors.ShardedWriter(out, specs, max_shard_bytes=3 << 19)  # two shards of three tensors
    for name, t in weights.items():
        writer.write(name, t)
    writer.finalize()
    assert len(writer.files) == 2
    # each shard: 1.5 MiB written, so its write-back started once (after its second tensor)
    assert len(started) == 2 and len(set(started)) == 2, started
    loaded = {}
    for file in writer.files:
        loaded |= load_file(out / file)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())
