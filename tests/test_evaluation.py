"""lm-eval over in-memory models on the zoo's task files, checked against an independent log-likelihood computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeflow.errors import EvaluationError
from mergeflow.evaluation import EvalResult, evaluate, evaluate_path, zoo_task_config
from mergeflow.zoo import Zoo
from tests.zoo_fixtures import test_zoo  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer(test_zoo: Zoo):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_zoo.base)


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32")


def reference_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Accuracy by hand: sum of the log-probabilities of each choice's tokens after the context, argmax vs gold."""
    correct = 0
    with torch.no_grad():
        for row in rows:
            ctx = tokenizer(row["context"]).input_ids
            scores = []
            for choice in row["choices"]:
                ids = tokenizer(row["context"] + " " + choice).input_ids
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
                scores.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return 100.0 * correct / len(rows)


@pytest.mark.parametrize("model_name", ["base", "nli"])
def test_accuracy_equals_an_independent_computation(test_zoo: Zoo, tokenizer, model_name: str) -> None:  # noqa: F811
    model = load(test_zoo.base if model_name == "base" else test_zoo.experts[model_name])
    result = evaluate(model, tokenizer, ["nli", "complete"], zoo=test_zoo, limit=20)
    for task in ("nli", "complete"):  # one-token answers (lm-eval's grouped path) and multi-token answers
        expected = reference_accuracy(model, tokenizer, test_zoo.rows(task, "test")[:20])
        assert result.scores[task].acc == pytest.approx(expected, abs=1e-9), task
        assert result.scores[task].n == 20


def test_groups_aliases_splits_and_repeated_calls(test_zoo: Zoo, tokenizer) -> None:  # noqa: F811
    model = load(test_zoo.experts["topic"])
    full = evaluate(model, tokenizer, "zoo,zoo-ood", zoo=test_zoo)
    assert isinstance(full, EvalResult)
    assert list(full.scores) == [*test_zoo.in_domain, *test_zoo.ood]
    assert all(s.n == 200 and 0 <= s.acc <= 100 and s.stderr >= 0 for s in full.scores.values())
    assert full.groups["zoo"] == pytest.approx(sum(full.scores[t].acc for t in test_zoo.in_domain) / 3, abs=1e-3)
    # the cached lm-eval tasks give the same numbers again; a task by lm-eval name is the same task
    again = evaluate(model, tokenizer, ["zoo_topic"], zoo=test_zoo)
    assert again.scores["topic"] == full.scores["topic"]
    assert full.raw["results"]["zoo_topic"]["acc,none"] == pytest.approx(full.scores["topic"].acc / 100)
    val = evaluate(model, tokenizer, ["topic"], zoo=test_zoo, split="validation")
    assert val.split == "validation" and val.scores["topic"].n == test_zoo.manifest["task_info"]["topic"]["splits"][
        "validation"]["n"]  # fmt: skip
    json.dumps(full.to_dict())  # serialisable


def test_concurrent_evaluations_equal_sequential_ones(test_zoo: Zoo, tokenizer) -> None:  # noqa: F811
    """Threads of a task runner evaluate at the same time (the reported and the selection split of one merge, and
    two models on the same split, which take turns on the shared task objects): every result equals the one of a
    call on its own, and torch's thread count and lm-eval's log level are restored when the last one leaves."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    models = {name: load(test_zoo.experts[name]) for name in ("topic", "nli")}
    jobs = [("topic", "test"), ("topic", "validation"), ("nli", "test"), ("nli", "validation")]

    def run(job: tuple[str, str]) -> dict:
        name, split = job
        return evaluate(models[name], tokenizer, "zoo,zoo-ood", zoo=test_zoo, split=split, limit=40).to_dict()["scores"]

    alone = [run(job) for job in jobs]
    threads, level = torch.get_num_threads(), logging.getLogger("lm_eval").level
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert alone[0] != alone[2] and alone[0] != alone[1]  # the jobs differ, so equality is not vacuous
    assert torch.get_num_threads() == threads and logging.getLogger("lm_eval").level == level


def test_task_configs_are_absolute_at_run_time(test_zoo: Zoo, tmp_path: Path, monkeypatch, tokenizer) -> None:  # noqa: F811
    cfg = zoo_task_config(test_zoo, "nli", "validation")
    files = cfg["dataset_kwargs"]["data_files"]
    assert set(files) == {"validation", "fewshot"} and all(Path(p).is_absolute() for p in files.values())
    assert cfg["validation_split"] == "validation" and "test_split" not in cfg
    monkeypatch.chdir(tmp_path)  # lm-eval resolves relative data files against the working directory
    result = evaluate_path(test_zoo.experts["complete"], ["complete"], zoo=test_zoo.root, limit=10)
    assert result.scores["complete"].n == 10


def test_unknown_tasks_and_bad_arguments(test_zoo: Zoo, tokenizer) -> None:  # noqa: F811
    model = load(test_zoo.base)
    with pytest.raises(EvaluationError, match="not in the test zoo"):
        evaluate(model, tokenizer, ["sentiment"], zoo=test_zoo)  # a zoo task, but only in the full zoo
    with pytest.raises(EvaluationError, match="unknown split"):
        evaluate(model, tokenizer, ["zoo"], zoo=test_zoo, split="train")
    with pytest.raises(EvaluationError, match="no evaluation task"):
        evaluate(model, tokenizer, " , ", zoo=test_zoo)
    with pytest.raises(EvaluationError, match="not a model folder"):
        evaluate_path(test_zoo.tasks_dir, ["zoo"], zoo=test_zoo)


@pytest.mark.slow
def test_names_unknown_to_the_zoo_and_to_lm_eval_are_an_error(test_zoo: Zoo, tokenizer) -> None:  # noqa: F811
    # indexing lm-eval's built-in tasks takes 10-20 s
    with pytest.raises(EvaluationError, match="topic, nli, complete"):
        evaluate(load(test_zoo.base), tokenizer, ["no_such_task_xyz"], zoo=test_zoo)


def test_cli_build_and_eval(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    from click.testing import CliRunner

    from mergeflow.zoo.commands import eval_command, zoo

    runner = CliRunner()
    built = runner.invoke(zoo, ["build", str(test_zoo.root), "--size", "test", "--seed", "0", "--no-progress"])
    assert built.exit_code == 0, built.output
    assert str(test_zoo.experts["topic"]) in built.output
    out = tmp_path / "scores.json"
    args = [
        str(test_zoo.experts["topic"]),
        "--tasks",
        "topic,review_topic",
        "--limit",
        "30",
        "--zoo",
        str(test_zoo.root),
    ]
    res = runner.invoke(eval_command, [*args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    assert scores["scores"]["topic"]["n"] == 30 and scores["split"] == "test"
    assert "review_topic" in res.output
    bad = runner.invoke(eval_command, [str(test_zoo.base), "--tasks", "sentiment", "--zoo", str(test_zoo.root)])
    assert bad.exit_code == 2 and "not in the test zoo" in bad.output
