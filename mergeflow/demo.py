"""The demo: build the offline zoo (cached), merge its experts with the data-free methods, evaluate every merge with
lm-eval and print a table shaped like APL's Table 1 (rows = methods, columns = tasks, then the average), with a
picture of the same table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from tqdm.auto import tqdm

from mergeflow.cli import user_errors
from mergeflow.zoo.build import build_zoo
from mergeflow.zoo.matrix import DATA_AWARE_MERGES, DATA_FREE_MERGES, Matrix, format_table, save_png


def run_demo(size: str = "full", seed: int = 0, out: Path = Path("demo_results"), limit: int | None = None,
             progress: bool = True, zoo_dir: Path | None = None, data_aware: bool = True,
             regime: str = "sft") -> dict[str, Any]:
    start = time.perf_counter()
    click.echo(f"== 1/3 zoo ({size}, {regime} regime, seed {seed}): built once, then served from MERGEFLOW_HOME")
    zoo = build_zoo(zoo_dir, size=size, seed=seed, regime=regime, progress=progress)
    built = time.perf_counter() - start
    click.echo(f"   {zoo.root} ({built:.0f} s); tasks {', '.join(zoo.in_domain)}; out-of-domain "
               f"{', '.join(zoo.ood)}")
    merges = DATA_FREE_MERGES + (DATA_AWARE_MERGES if data_aware else ())
    total = 1 + len(zoo.in_domain) + len(merges)
    aware = sum(m.data_aware for m in merges)
    click.echo(f"== 2/3 merge the {len(zoo.in_domain)} experts with {len(merges) - aware} data-free and {aware} "
               f"data-aware methods (importance on the few-shot / calibration splits), evaluate {total} models on "
               f"{len(zoo.tasks)} tasks (cached by content)")
    bar = tqdm(total=total, desc="merge + evaluate", unit="model", disable=not progress, dynamic_ncols=True)
    seen = {"n": 0}

    def step(label: str) -> None:
        if seen["n"]:
            bar.update(1)
        seen["n"] += 1
        bar.set_postfix_str(label)

    matrix = Matrix(zoo, split="test", limit=limit, progress=step).run(merges, seed=seed)
    bar.update(1)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    table = format_table(matrix)
    (out / "accuracy_table.txt").write_text(table + "\n")
    png = save_png(matrix, out / "accuracy_table.png")
    click.echo("== 3/3 results\n")
    click.echo(table)
    click.echo(f"\nwrote {out / 'accuracy_matrix.json'}, {out / 'accuracy_table.txt'} and {png} "
               f"in {time.perf_counter() - start:.0f} s")
    return matrix


@click.command("demo")
@click.option("--size", type=click.Choice(["full", "test"]), default="full", show_default=True,
              help="Zoo size: full (the benchmark zoo) or test (seconds to build).")
@click.option("--seed", type=int, default=0, show_default=True, help="Zoo seed (data, initialisation, DARE masks).")
@click.option("--regime", type=click.Choice(["hard", "sft"]), default="sft", show_default=True,
              help="The zoo's merging regime (README: two regimes).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_results"), show_default=True,
              help="Folder for the table (txt, json, png).")
@click.option("--limit", type=int, default=None, help="Score only the first N test examples of each task.")
@click.option("--zoo", "zoo_dir", type=click.Path(path_type=Path), default=None,
              help="Zoo folder (default: MERGEFLOW_HOME/zoo/<size>-seed<seed>, built if missing).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--data-free-only", is_flag=True, help="Skip the data-aware methods (APL, Sens, SLTA, LM-Cocktail, "
              "Fisher, RegMean).")
def demo_command(size: str, seed: int, regime: str, out: Path, limit: int | None, zoo_dir: Path | None,
                 no_progress: bool, data_free_only: bool) -> None:
    """Build the zoo, merge its experts with the data-free and data-aware methods, evaluate, print the table."""
    user_errors(run_demo)(size=size, seed=seed, regime=regime, out=out, limit=limit, progress=not no_progress, zoo_dir=zoo_dir,
                          data_aware=not data_free_only)
