"""The ``mergeflow`` command.

Every error a user can cause prints one line (``error: ...``) and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

import click

from mergeflow import __version__
from mergeflow.errors import ENVIRONMENT_ERRNOS, MergeflowError, storage_error

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    # third-party progress bars and hub lookups would drown ours; nothing here needs the network
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # big fp32 temporaries: transparent huge pages cut their page-fault cost several-fold (read at torch import)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _sigterm_as_interrupt() -> None:
    # a killed merge must still remove its temporary folder: turn SIGTERM into an exception that unwinds
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print MergeflowError (and an OSError the environment caused) as one line and exit 2 (traceback only with
    --debug)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except MergeflowError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as exc:
            # disk full, permission denied, too many open files... that no layer below named: still one line
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            if debug:
                traceback.print_exc()
            click.echo(f"error: {storage_error(exc, 'access')}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


class LazyGroup(click.Group):
    """Subcommands that live beside heavy code (torch, lm-eval) are imported only when invoked."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {"zoo": ("mergeflow.zoo.commands", "zoo"), "eval": ("mergeflow.zoo.commands", "eval_command"),
            "demo": ("mergeflow.demo", "demo_command")}
    # their one-line help, so that `mergeflow --help` lists them without importing them (torch and transformers
    # take seconds); a test checks each against the command's own docstring
    lazy_help: ClassVar[dict[str, str]] = {
        "zoo": "The offline model zoo: a small Llama base, one expert per task, lm-eval task files.",
        "eval": "Evaluate the model folder MODEL with lm-eval and print accuracy per task.",
        "demo": "Build the zoo, merge its experts with the data-free and data-aware methods, evaluate, print the table.",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise click.UsageError(f"'{name}' is unavailable: {exc}") from None
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, click.Command(name, help=self.lazy_help[name]).get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mergeflow")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--verify-cache", is_flag=True,
              help="Hash every file of each reused cache entry in full (default: small files in full, large ones by "
                   "size and sampled blocks).")
def main(debug: bool, verify_cache: bool) -> None:
    """Merge fine-tuned language models: streaming merge engine, data-aware methods, evaluation, registry."""
    _quiet_libraries()
    if verify_cache:
        # read by every cache lookup, here and in the worker processes this command starts
        os.environ["MERGEFLOW_VERIFY_CACHE"] = "full"


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--mergekit-compat", is_flag=True, default=None,
              help="Reproduce mergekit 0.1.x semantics exactly (per-tensor trim, L1 rescale, dtypes).")
@click.option("--seed", type=int, default=None, help="Seed of random methods (DARE, DELLA); overrides the recipe.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, only once the merge is done).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the per-tensor arithmetic runs.")
@click.option("--shard-size", default="1GB", show_default=True, help="Maximum bytes per output shard (e.g. 500MB, 2GB).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for the arithmetic [default: all cores but one, left to the reader/writer threads; "
                   "all cores for the SVD-based methods].")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@user_errors
def merge(recipe: Path, out: Path, mergekit_compat: bool | None, seed: int | None, overwrite: bool, device: str,
          shard_size: str, threads: int | None, no_progress: bool) -> None:
    """Merge the models of RECIPE (a mergeflow or mergekit YAML) into the folder OUT."""
    # torch-heavy: imported when the command runs, so `mergeflow --help` and the other commands start fast
    from mergeflow.engine import MergeOptions
    from mergeflow.engine import merge as run_merge
    from mergeflow.recipe import load_recipe
    from mergeflow.tensors import parse_size

    try:
        parse_size(shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard-size") from None
    _sigterm_as_interrupt()
    r = load_recipe(recipe, mergekit_compat=mergekit_compat, seed=seed)
    result = run_merge(r, out, options=MergeOptions(device=device, shard_size=shard_size, overwrite=overwrite,
                                                    threads=threads, progress=not no_progress))
    rate = result.bytes_written / max(result.seconds, 1e-9)
    click.echo(f"merged {result.n_tensors} tensors ({result.bytes_written / 1e6:.1f} MB) into {result.path} in "
               f"{result.seconds:.1f} s ({rate / 1e6:.0f} MB/s); recipe {result.recipe_hash[:19]}")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--device", default="auto", show_default=True,
              help="Where the importance stage would run (auto: CUDA if present, else the CPU); its time estimate "
                   "is measured there.")
@click.option("--mergekit-compat", is_flag=True, default=None,
              help="Check (and estimate the memory of) the merge as `mergeflow merge --mergekit-compat` runs it.")
@user_errors
def check(recipe: Path, as_json: bool, device: str, mergekit_compat: bool | None) -> None:
    """Check that the models of RECIPE can be merged: architectures, tensors, vocabularies, dtypes, memory; and
    estimate the time and peak memory of each importance entry (its estimators are not run)."""
    # torch-heavy: imported when the command runs, so `mergeflow --help` and the other commands start fast
    from mergeflow import streaming
    from mergeflow.devices import pick_device
    from mergeflow.engine import plan_merge, resolve_inputs
    from mergeflow.importance.costs import render
    from mergeflow.importance.recipes import importance_estimates
    from mergeflow.recipe import load_recipe

    r = load_recipe(recipe, mergekit_compat=mergekit_compat)
    if r.importance:
        # the importance stage is what is estimated here, not run (hours at 3B on a CPU)
        inputs, _ = resolve_inputs(r)
        plan = streaming.plan_merge(r, inputs, strict=False, require_coefficients=False)
    else:
        plan = plan_merge(r, strict=False)
    plan.close()
    report = plan.report
    estimates: list[dict] = []
    if r.importance and report.ok:
        snapshot = (inputs.base or inputs.experts[0]).model_folder
        estimates = importance_estimates(r, snapshot, device=pick_device(device))
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "problems": report.problems, "warnings": report.warnings,
                               "estimate": report.estimate, "vocabulary": report.vocabulary,
                               "importance_estimate": estimates,
                               "models": [m.__dict__ for m in report.models]}, indent=2))
    else:
        click.echo(report.render())
        for e in estimates:
            click.echo("\n".join(render(e)))
    if not report.ok:
        sys.exit(EXIT_USER_ERROR)


@main.command()
@click.argument("name", required=False)
def methods(name: str | None) -> None:
    """List the merge methods and the importance estimators with their parameters, defaults and papers (or
    describe NAME, a method or an estimator)."""
    # torch-heavy: imported when the command runs, so `mergeflow --help` and the other commands start fast
    from mergeflow.importance.base import ESTIMATORS, all_estimators
    from mergeflow.methods.base import METHODS, all_methods

    if name is not None and name not in METHODS:
        if name not in ESTIMATORS:
            raise click.UsageError(f"{name!r} is neither a merge method ({', '.join(METHODS)}) nor an importance "
                                   f"estimator ({', '.join(ESTIMATORS)})")
        _describe_estimators([ESTIMATORS.lookup(name)])
        return
    chosen = [METHODS.lookup(name)] if name else all_methods()
    for m in chosen:
        flags = [f for f, on in (("base model", m.needs_base), ("random", m.random)) if on]
        aliases = sorted(n for n in METHODS if n != m.name and METHODS[n] is m)
        click.echo(click.style(m.name, bold=True) + (f"  [{', '.join(flags)}]" if flags else "")
                   + (f"  (also: {', '.join(aliases)})" if aliases else ""))
        click.echo(f"    {m.summary}")
        click.echo(f"    paper: {m.paper}")
        if m.requires_estimator:
            click.echo(f"    needs the importance estimator {m.requires_estimator}")
        _describe_params(m.params)
        click.echo("")
    if name is None:
        click.echo(click.style("Importance estimators", bold=True) + " (recipe `importance:`; they write "
                   "coefficients the methods above consume)\n")
        _describe_estimators(all_estimators())


def _describe_estimators(estimators: list) -> None:
    for e in estimators:
        flags = [f for f, on in (("base model", e.needs_base), ("out-of-domain", e.supports_ood)) if on]
        click.echo(click.style(e.name, bold=True) + (f"  [{', '.join(flags)}]" if flags else ""))
        click.echo(f"    {e.summary}")
        click.echo(f"    paper: {e.paper}")
        click.echo(f"    data: split {e.default_split}, {e.default_n or 'all'} examples per task by default")
        _describe_params(e.params)
        click.echo("")


def _describe_params(params: tuple) -> None:
    for p in params:
        default = "required" if p.required else f"default {p.default!r}"
        if p.default_compat is not None:
            default += f" (mergekit_compat: {p.default_compat!r})"
        scope = "per model" if p.per_model else "shared"
        choices = f" one of {list(c for c in p.choices if c)}" if p.choices else ""
        click.echo(f"    - {p.name} ({p.type.__name__}, {scope}, {default}){choices}: {p.help}")

if __name__ == "__main__":
    main()
