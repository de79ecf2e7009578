"""Few-shot and calibration examples for the estimators, rendered in each task's own prompt format (docs/methods.md D-34).

A task is named like an evaluation task: a zoo task (``sentiment`` or ``zoo_sentiment``, resolved in the given zoo),
any lm-eval task (rendered through lm-eval's own ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``), or a
JSON-lines file whose rows are ``{"context", "choices", "gold"}`` (multiple choice) or ``{"prompt", "answer"}``.
Every example becomes a prompt and its gold answer; the same rendered text is fed to every model (base and experts),
so scores are comparable across models.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergeflow.errors import MergeflowError

if TYPE_CHECKING:
    from mergeflow.zoo.build import Zoo

# Which split each use reads by default (the zoo has all of them; lm-eval tasks map them to their own splits).
SPLITS = ("fewshot", "calib", "validation", "train", "test")


class TaskDataError(MergeflowError):
    """Task data that cannot be found or read."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str                           # the gold continuation, without the delimiter
    delimiter: str = " "                  # between prompt and answer (lm-eval's target_delimiter)
    choices: tuple[str, ...] | None = None  # multiple-choice options (the gold one is ``answer``)
    gold: int | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.delimiter + self.answer


@dataclass(frozen=True)
class TaskData:
    """``n`` examples of one task's split, drawn with ``seed``; ``sha256`` identifies exactly these examples."""

    task: str
    split: str
    examples: tuple[Example, ...]
    seed: int
    sha256: str

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "n": len(self.examples), "seed": self.seed,
                "sha256": self.sha256}


def _hash_examples(examples: tuple[Example, ...]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.delimiter, ex.answer], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sample(rows: list[Any], n: int | None, seed: int) -> list[Any]:
    """The first ``n`` rows of a seeded permutation (seed 0 on a few-shot split: its first rows, in order)."""
    if n is None or n >= len(rows):
        return list(rows) if seed == 0 else random.Random(seed).sample(rows, len(rows))
    if seed == 0:
        return rows[:n]
    return random.Random(seed).sample(rows, n)


def _row_example(row: dict[str, Any], delimiter: str, where: str) -> Example:
    if "context" in row and "choices" in row and "gold" in row:
        choices = tuple(str(c) for c in row["choices"])
        gold = int(row["gold"])
        if not 0 <= gold < len(choices):
            raise TaskDataError(f"{where}: gold index {gold} outside the {len(choices)} choices")
        return Example(str(row["context"]), choices[gold], delimiter, choices, gold)
    if "prompt" in row and "answer" in row:
        return Example(str(row["prompt"]), str(row["answer"]), delimiter)
    raise TaskDataError(f"{where}: rows need context/choices/gold or prompt/answer, got keys {sorted(row)}")


def _read_jsonl(path: Path, delimiter: str) -> list[Example]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise TaskDataError(f"cannot read task data {path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{i}: not JSON ({e.msg})") from None
        out.append(_row_example(row, delimiter, f"{path}:{i}"))
    if not out:
        raise TaskDataError(f"{path}: no examples")
    return out


def load_task_data(task: str, split: str = "fewshot", n: int | None = None, seed: int = 0, *,
                   zoo: Zoo | str | Path | None = None) -> TaskData:
    """``n`` examples of ``task``'s ``split`` (all when ``n`` is None), drawn reproducibly with ``seed``."""
    rows, name = _zoo_or_file(task, split, zoo)
    if rows is None:
        rows, name = _lm_eval_rows(task, split), task
    examples = tuple(_sample(rows, n, seed))
    if n is not None and len(examples) < n:
        raise TaskDataError(f"task {name} split {split} has {len(rows)} examples, {n} requested")
    return TaskData(name, split, examples, seed, _hash_examples(examples))


def _zoo_or_file(task: str, split: str, zoo: Zoo | str | Path | None) -> tuple[list[Example] | None, str]:
    if task.endswith((".jsonl", ".json")) or Path(task).is_file():
        return _read_jsonl(Path(task), " "), task
    # The zoo and lm-eval glue import transformers (seconds): imported here, only when a zoo or lm-eval task is read,
    # so validating a recipe's importance section (recipe -> importance.base -> here) stays fast.
    from mergeflow.evaluation import resolve_zoo
    from mergeflow.zoo.build import LM_EVAL_PREFIX, Zoo
    from mergeflow.zoo.tasks import TASKS

    short = task.removeprefix(LM_EVAL_PREFIX)
    if short not in TASKS:
        return None, task
    if zoo is None:
        zoo = resolve_zoo(None, [short])
    elif not isinstance(zoo, Zoo):
        zoo = Zoo.load(zoo)
    if short not in zoo.tasks:
        raise TaskDataError(f"task {short!r} is not in the zoo at {zoo.root}; its tasks: {', '.join(zoo.tasks)}")
    cfg = yaml.safe_load((zoo.tasks_dir / f"{LM_EVAL_PREFIX}{short}.yaml").read_text())
    path = zoo.data_file(short, split)
    if not Path(path).exists():
        raise TaskDataError(f"zoo task {short} has no {split} split ({path})")
    return _read_jsonl(Path(path), cfg.get("target_delimiter", " ")), short


def _lm_eval_rows(task: str, split: str) -> list[Example]:
    """Render an lm-eval task's docs with its own templates (users with the data: hellaswag, mmlu_*, …)."""
    from mergeflow.evaluation import offline_env, task_manager  # lm-eval and transformers: see _zoo_or_file

    offline_env()
    tm = task_manager(None)
    if task not in tm.all_tasks:
        raise TaskDataError(f"unknown task {task!r}: not a zoo task, a .jsonl file or an lm-eval task")
    obj = tm.load([task])["tasks"][task]
    docs = _split_docs(obj, split)
    delimiter = getattr(obj.config, "target_delimiter", " ")
    out = []
    for doc in docs:
        prompt = obj.doc_to_text(doc)
        target = obj.doc_to_target(doc)
        choices = obj.doc_to_choice(doc) if obj.config.doc_to_choice is not None else None
        if choices is not None:
            gold = target if isinstance(target, int) else choices.index(target)
            out.append(Example(str(prompt), str(choices[gold]), delimiter, tuple(map(str, choices)), int(gold)))
        else:
            out.append(Example(str(prompt), str(target[0] if isinstance(target, list) else target), delimiter))
    if not out:
        raise TaskDataError(f"lm-eval task {task} has no documents in split {split}")
    return out


def _split_docs(obj: Any, split: str) -> list[Any]:
    getters = {"fewshot": ("fewshot_docs", "training_docs", "validation_docs"),
               "calib": ("training_docs", "validation_docs"), "train": ("training_docs",),
               "validation": ("validation_docs",), "test": ("test_docs",)}
    for name in getters.get(split, ()):
        has = getattr(obj, f"has_{name}", None)
        if has is not None and not has():
            continue
        docs = getattr(obj, name)()
        if docs is not None:
            return list(docs)
    raise TaskDataError(f"lm-eval task {obj.config.task} has no split usable as {split!r}")
