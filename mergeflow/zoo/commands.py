"""``mergeflow zoo build`` and ``mergeflow eval``: click commands, mounted by the main CLI."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergeflow.cli import user_errors
from mergeflow.errors import OutputPathError
from mergeflow.evaluation import evaluate_path
from mergeflow.zoo.build import REGIMES, SIZES, Zoo, build_zoo
from mergeflow.zoo.diagnose import diagnose, format_report, public_report
from mergeflow.zoo.matrix import matrix_command


@click.group("zoo")
def zoo() -> None:
    """The offline model zoo: a small Llama base, one expert per task, lm-eval task files."""


@zoo.command("build")
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option(
    "--size",
    type=click.Choice(sorted({s.size_name for s in SIZES.values()})),
    default="full",
    show_default=True,
    help="full: 6 experts, 1000 test examples per task (about 10 min on 2 cores); test: 3 experts, < 1 min.",
)
@click.option(
    "--regime",
    type=click.Choice(list(REGIMES)),
    default="hard",
    show_default=True,
    help="hard: experts fully fine-tuned far from a base at chance (large, interfering task vectors); sft: small "
    "task vectors on a base that holds the skills latently, as for 7B SFT experts. See the README.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the data and the initial weights."
)
@click.option("--force", is_flag=True, help="Rebuild even if OUT already holds this zoo.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes for the experts (default: 2 for full, 1 for test); the weights do not depend on it.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def build(out: Path | None, size: str, regime: str, seed: int, force: bool, jobs: int | None,
          no_progress: bool) -> None:
    """Build the zoo into OUT (default: MERGEFLOW_HOME/zoo/[REGIME-]SIZE-seedSEED); instant if it is already there."""
    z = build_zoo(out, size=size, seed=seed, regime=regime, force=force, jobs=jobs, progress=not no_progress)
    m = z.manifest
    click.echo(f"zoo {z.size} ({z.regime} regime) seed {z.seed} at {z.root} "
               f"(built in {m['timings']['total_s']:.0f} s)")
    click.echo(f"  base      {z.base}")
    for task, path in z.experts.items():
        click.echo(f"  expert    {path}   ({task})")
    click.echo(f"  tasks     {z.tasks_dir}   in-domain: {', '.join(z.in_domain)}; out-of-domain: {', '.join(z.ood)}")


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--tasks",
    default="zoo,zoo-ood",
    show_default=True,
    help="Comma-separated: zoo, zoo-ood, zoo task names (topic, …) or any lm-eval task (hellaswag, …).",
)
@click.option(
    "--split",
    type=click.Choice(["test", "validation"]),
    default="test",
    show_default=True,
    help="Zoo split to score: validation is for tuning merges, test for reporting.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N examples per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--num-fewshot",
    type=click.IntRange(min=0),
    default=None,
    help="Few-shot examples per prompt (default: 0 for zoo tasks, the task's own for lm-eval tasks).",
)
@click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The zoo whose tasks to use (default: MERGEFLOW_HOME/zoo/full-seed0).",
)
@click.option(
    "--trust-task-code",
    is_flag=True,
    help="Let lm-eval run the code of the zoo's task files (!function imports, include:, templates). Needed for a "
    "zoo folder outside MERGEFLOW_HOME/zoo whose task files are not the ones mergeflow writes; code reaching "
    "outside the zoo folder is refused even so.",
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the scores to this JSON file."
)
@user_errors
def eval_command(model: Path, tasks: str, split: str, limit: int | None, batch_size: int, device: str,
                 num_fewshot: int | None, zoo_dir: Path | None, trust_task_code: bool,
                 json_out: Path | None) -> None:  # fmt: skip
    """Evaluate the model folder MODEL with lm-eval and print accuracy per task."""
    result = evaluate_path(model, tasks, zoo=zoo_dir, split=split, limit=limit, batch_size=batch_size,
                           device=device, num_fewshot=num_fewshot, trust_task_code=trust_task_code)  # fmt: skip
    width = max(len(name) for name in [*result.scores, *result.groups, "task"])
    click.echo(f"{'task':<{width}}  {'acc %':>7}  {'± se':>6}  {'n':>6}   ({split} split)")
    for name, s in result.scores.items():
        click.echo(f"{name:<{width}}  {s.acc:7.2f}  {s.stderr:6.2f}  {s.n:6d}")
    for group, acc in result.groups.items():
        click.echo(f"{group:<{width}}  {acc:7.2f}  {'':>6}  {'':>6}   (mean)")
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({"model": str(model), **result.to_dict()}, indent=2) + "\n")
        except OSError as e:
            raise OutputPathError(f"cannot write {json_out}: {e.strerror}") from None


@zoo.command("diagnose")
@click.argument("zoo_ref", metavar="ZOO")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the report (regime, base, experts_own, dare_retention, ta_normalized, ...) to this file.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N test examples per task.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the DARE masks.")
@user_errors
def diagnose_command(zoo_ref: str, json_out: Path | None, limit: int | None, seed: int) -> None:
    """Which merging regime the zoo ZOO (a folder or zoo:[REGIME-]SIZE[@SEED]) is in: its experts, how much of each
    survives DARE alone, how much task arithmetic keeps, its task vectors' geometry (test split)."""
    z = Zoo.load(zoo_ref)
    report = diagnose(z, limit=limit, seed=seed, progress=lambda msg: click.echo(f"  scoring {msg}", err=True))
    click.echo(format_report(report))
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(public_report(report), indent=2) + "\n")
        except OSError as e:
            raise OutputPathError(f"cannot write {json_out}: {e.strerror}") from None


def _add_matrix() -> None:
    zoo.add_command(matrix_command)


_add_matrix()
