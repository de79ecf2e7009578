"""The demo's pipeline end to end on the test zoo: merges, evaluation, table, picture, and the content cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeflow.zoo import Zoo
from mergeflow.zoo.matrix import DATA_AWARE_MERGES, DATA_FREE_MERGES, experts_row
from tests.zoo_fixtures import test_zoo  # noqa: F401


def test_demo_end_to_end_and_warm_rerun(test_zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mergeflow import evaluation
    from mergeflow.demo import run_demo

    matrix = run_demo(size="test", regime="hard", zoo_dir=test_zoo.root, out=tmp_path / "demo", limit=40, progress=False)
    printed = capsys.readouterr().out
    labels = [m.label for m in DATA_FREE_MERGES + DATA_AWARE_MERGES]
    assert {"lm_cocktail", "fisher", "regmean", "ta+sens", "mi-ta+apl@0.9", "slta(attn_mlp)", "tsv", "iso_c", "iso_cts",
            "wudi"} <= set(labels)
    assert list(matrix["models"]) == ["base", *(f"expert:{t}" for t in test_zoo.in_domain), *labels]
    assert matrix["tasks"] == {"in_domain": list(test_zoo.in_domain), "ood": list(test_zoo.ood)}
    for label in ["base", "experts (own task)", *labels]:
        assert label in printed
    for scores in matrix["models"].values():
        assert set(scores) == set(test_zoo.tasks)
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    # the experts are what make the merging problem: each beats the base on its own task
    own = experts_row(matrix)
    assert all(own[t] > matrix["models"]["base"][t] + 20 for t in test_zoo.in_domain)
    # merges differ from one another (the table is not the same row repeated)
    averages = {label: sum(matrix["models"][label][t] for t in test_zoo.in_domain) for label in labels}
    assert max(averages.values()) - min(averages.values()) > 5 * len(test_zoo.in_domain)
    saved = json.loads((tmp_path / "demo" / "accuracy_matrix.json").read_text())
    assert saved["models"] == matrix["models"]
    assert (tmp_path / "demo" / "accuracy_table.png").stat().st_size > 10_000

    # a warm re-run is served from the content-addressed cache: no evaluation and no estimator pass at all
    from mergeflow.importance.base import ImportanceRun

    def no_eval(*args, **kwargs):
        raise AssertionError("evaluate() or an estimator called on a warm re-run")

    monkeypatch.setattr(evaluation, "evaluate", no_eval)
    monkeypatch.setattr(ImportanceRun, "load_model", no_eval)
    again = run_demo(size="test", regime="hard", zoo_dir=test_zoo.root, out=tmp_path / "demo2", limit=40, progress=False)
    assert again["models"] == matrix["models"]


def test_zoo_matrix_command_json_format(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    from click.testing import CliRunner

    from mergeflow.cli import main

    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["zoo", "matrix", str(test_zoo.root), "--json", str(out), "--limit", "40",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    matrix = json.loads(out.read_text())
    assert matrix["tasks"] == {"in_domain": list(test_zoo.in_domain), "ood": list(test_zoo.ood)}
    expected = {"base", *(f"expert:{t}" for t in test_zoo.in_domain), "task_arithmetic@0.3", "ties@0.2"}
    assert expected <= set(matrix["models"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "task_arithmetic@1.0" in result.output
