"""Issue 15, cases 1, 2, 3 and 7: what a merge reads and writes stays where the recipe says, and nothing non-finite
is written.

1. files copied beside the merged weights (configs, tokenizer) never follow a symlink out of their checkpoint; weight
   shards linked outside it are refused under ``confine_paths``;
2. ``confine_paths`` compares real paths (``~`` expanded, symlinks resolved, relative to the recipe's folder, never
   the working directory);
3. recipe parameters are finite (and within float32's range), and a merged tensor holding NaN/Inf is refused before
   the output is renamed into place;
7. a model's ``task`` file is read against the recipe's folder by ``mergeflow merge`` and is confined too.

Every refusal is checked as the user sees it: exit code 2, one ``error:`` line, no output and no leftovers.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergeflow.checkpoints import contained_file, resolve
from mergeflow.cli import main
from mergeflow.engine import MergeOptions, merge
from mergeflow.errors import NonFiniteResultError, UnsafePathError
from mergeflow.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = MergeOptions(progress=False)


@pytest.fixture(autouse=True)
def _keep_sigterm():
    """The merge command turns SIGTERM into KeyboardInterrupt; in-process runs must not leave that to pytest."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _refused(result, *needles: str) -> str:
    """The run failed as a user error: exit 2 and exactly one ``error:`` line on stderr holding ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_output(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _workspace(families, tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A recipe folder holding copies of the tiny Llama base and two experts."""
    base, experts = families("llama")
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copytree(base, folder / "base")
    for i, e in enumerate(experts[:2]):
        shutil.copytree(e, folder / f"expert{i}")
    return folder, folder / "base", [folder / "expert0", folder / "expert1"]


def _recipe(folder: Path, body: str = "", *, confine: bool = False, name: str = "r.yaml",
            base: str = "./base", models: tuple[str, ...] = ("./expert0", "./expert1")) -> Path:
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\n"
            + ("confine_paths: true\n" if confine else "")
            + "models:\n" + "".join(f"  - model: {m}\n" for m in models) + body)
    path = folder / name
    path.write_text(text)
    return path


def _outside_copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    return dest


# ------------------------------------------------------------------------------ 1. side files and weight shards


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
@pytest.mark.parametrize("confine", [False, True])
def test_side_file_linked_outside_the_checkpoint_is_refused(families, tmp_path: Path, name: str,
                                                            confine: bool) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    # a valid file of the same kind, outside the checkpoint (a copy, so only the link itself can be the problem)
    secret = _outside_copy(base / name, tmp_path / "elsewhere" / name)
    (base / name).unlink()
    (base / name).symlink_to(secret)
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=confine)), str(out), "--no-progress")
    _refused(result, f"{base / name}", "outside the checkpoint folder")
    _no_output(out)


def test_side_file_linked_inside_the_checkpoint_is_copied_as_a_plain_file(families, tmp_path: Path) -> None:
    folder, base, _ = _workspace(families, tmp_path)
    (base / "files").mkdir()
    (base / "tokenizer.json").rename(base / "files" / "tokenizer.json")
    (base / "tokenizer.json").symlink_to(Path("files") / "tokenizer.json")
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=True)), str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (base / "files" / "tokenizer.json").read_bytes()


def test_weight_shard_linked_outside_is_refused_under_confine_paths(families, tmp_path: Path) -> None:
    folder, _, experts = _workspace(families, tmp_path)
    shard = experts[1] / "model.safetensors"
    outside = _outside_copy(shard, tmp_path / "elsewhere" / "model.safetensors")
    shard.unlink()
    shard.symlink_to(outside)
    out = tmp_path / "out"
    result = _cli("merge", str(_recipe(folder, confine=True)), str(out), "--no-progress")
    _refused(result, f"weight file {shard}", "outside the checkpoint folder")
    _no_output(out)
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        resolve(experts[1], confine=True)
    # without confine_paths a shard kept on other storage is the user's choice (its bytes are hashed as usual)
    assert resolve(experts[1]).content_hash == resolve(families("llama")[1][1]).content_hash


def test_hub_snapshot_links_into_its_blobs_are_inside_the_checkpoint(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "b1").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "b1"))
    assert contained_file(snapshot, "tokenizer.json") == (repo / "blobs" / "b1").resolve()
    assert contained_file(snapshot, "missing.json") is None
    (tmp_path / "secret").write_text("x")
    (snapshot / "special_tokens_map.json").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        contained_file(snapshot, "special_tokens_map.json")


# ------------------------------------------------------------------------------------------ 3. non-finite values


def test_merged_tensor_overflow_is_refused_and_the_previous_output_kept(families, tmp_path: Path) -> None:
    folder, _, _ = _workspace(families, tmp_path)
    out = tmp_path / "out"
    merge(load_recipe(_recipe(folder)), out, options=QUIET)
    before = _snapshot(out)
    # finite weights whose sum overflows float16: the merged tensors are Inf
    bad = _recipe(folder, "parameters: {weight: 1.0e6, normalize: false}\nout_dtype: float16\n", name="bad.yaml")
    bad.write_text(bad.read_text().replace("task_arithmetic", "linear").replace("base_model: ./base\n", ""))
    with pytest.raises(NonFiniteResultError, match=r"the merged tensor '[\w.]+' has \d+ non-finite values"):
        merge(load_recipe(bad), out, options=MergeOptions(progress=False, overwrite=True))
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    fresh = tmp_path / "fresh"
    _refused(_cli("merge", str(bad), str(fresh), "--no-progress"), "non-finite values", "nothing was written")
    _no_output(fresh)
