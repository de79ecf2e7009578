"""The zoo's two regimes (hard, sft) and the regime report of `mergeflow zoo diagnose`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergeflow.cli import main
from mergeflow.errors import ZooError
from mergeflow.zoo import SIZES, Zoo, build_zoo, default_zoo_dir
from mergeflow.zoo.build import REGIMES, finetune_expert, parse_zoo_reference, sha256_file, variant_name
from mergeflow.zoo.corpus import LATENT, latent_tuning_examples, pretraining_blocks
from mergeflow.zoo.diagnose import REPORT_KEYS, diagnose, public_report, task_vector_geometry
from mergeflow.zoo.tasks import TOPICS, template_words
from mergeflow.zoo.tokenizer import BOS_ID, EOS_ID, zoo_vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sft_zoo(mergeflow_home: Path) -> Zoo:
    return build_zoo(size="test", regime="sft", seed=0, progress=False)


def test_the_hard_regime_is_unchanged() -> None:
    # The hash every committed hard-regime result was measured on (benchmarks/results/quality-full-seed0.json):
    # adding regimes must not invalidate cached hard zoos or change what they hold.
    assert SIZES["full"].recipe_hash().startswith("609c3187665d")
    assert SIZES["full"].regime == "hard" and "regime" not in SIZES["full"].to_json()


def test_variants_names_and_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert REGIMES == ("hard", "sft")
    assert variant_name("full") == "full" and variant_name("full", "sft") == "sft-full"
    assert variant_name("sft-test") == variant_name("test", "sft") == "sft-test"
    assert SIZES["sft-full"].size_name == "full" and SIZES["sft-full"].regime == "sft"
    with pytest.raises(ZooError, match="unknown zoo regime"):
        variant_name("full", "rlhf")
    with pytest.raises(ZooError, match="unknown zoo size"):
        variant_name("huge", "sft")
    assert parse_zoo_reference("zoo:sft-full@1/topic") == ("sft-full", 1, "topic")
    assert parse_zoo_reference("zoo:sft-test/base") == ("sft-test", 0, "base")
    with pytest.raises(ZooError, match="unknown size"):
        parse_zoo_reference("zoo:rlhf-full/base")
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path))
    assert default_zoo_dir("full", 2, regime="sft") == tmp_path.resolve() / "zoo" / "sft-full-seed2"
    # the regimes share the tokenizer, the tasks and the splits: only how base and experts are made differs
    for size in ("full", "test"):
        hard, sft = SIZES[size], SIZES[f"sft-{size}"]
        assert (hard.in_domain, hard.ood, hard.eval_splits) == (sft.in_domain, sft.ood, sft.eval_splits)


def test_latent_documents_use_the_zoo_vocabulary_and_never_a_task_template() -> None:
    import random

    rng = random.Random(0)
    words = template_words()
    templates = ("review :", "article :", "sentence1 :", "premise :", "compute :", "story :", "sentiment :",
                 "topic :", "same meaning", "does it follow", "mod 10 equals")
    verbalizers = {"sentiment": {"positive", "negative"}, "topic": set(TOPICS), "paraphrase": {"yes", "no"},
                   "nli": {"yes", "maybe", "no"}}
    assert set(LATENT) == {"sentiment", "topic", "paraphrase", "nli", "arith", "complete"}
    for task, make in LATENT.items():
        for _ in range(200):
            context, answer = make(rng)
            text = f"{context} {answer}"
            assert set(text.split()) <= words, (task, text)
            assert not any(t in text for t in templates), (task, text)
            assert not verbalizers.get(task, set()) & set(text.split()), (task, text)
    blocks = pretraining_blocks(zoo_vocab(), n_blocks=8, block_len=32, mix={"latent": 1.0}, prompt_tasks=(),
                                labelled_tasks=("topic", "arith"), label_noise=0.0, seed=0, bos_id=BOS_ID,
                                eos_id=EOS_ID, latent_weights={"topic": 0.0, "arith": 1.0})
    vocab = {i: w for w, i in zoo_vocab().items()}
    text = " ".join(vocab[int(i)] for i in blocks.flatten())
    assert "makes" in text and "so it was on" not in text  # weights choose which skills are stated
    # with weights, a task they do not name gets no latent documents (complete's form is never drawn here)
    blocks = pretraining_blocks(zoo_vocab(), n_blocks=8, block_len=32, mix={"latent": 1.0}, prompt_tasks=(),
                                labelled_tasks=("complete", "arith"), label_noise=0.0, seed=0, bos_id=BOS_ID,
                                eos_id=EOS_ID, latent_weights={"arith": 1.0})
    assert " was in the " not in " ".join(vocab[int(i)] for i in blocks.flatten())
    tuning = latent_tuning_examples(50, {"arith": 1.0, "nli": 0.0}, seed=0)
    assert len(tuning) == 50 and all(c.endswith("makes") and a.isdigit() for c, a in tuning)
    assert tuning == latent_tuning_examples(50, {"arith": 1.0}, seed=0) != latent_tuning_examples(50, {"arith": 1.0}, 1)


def test_sft_zoo_builds_deterministically(sft_zoo: Zoo, tmp_path: Path) -> None:
    assert sft_zoo.size == "sft-test" and sft_zoo.regime == "sft"
    assert sft_zoo.manifest["hparams"]["regime"] == "sft"
    assert sft_zoo.root.name == "sft-test-seed0"
    assert Zoo.load("zoo:sft-test").root == sft_zoo.root  # a reference finds the built zoo
    # the same tokenizer and task data as the hard zoo of the same size and seed
    hard = SIZES["test"]
    assert sft_zoo.manifest["tokenizer_sha256"] == sha256_file(sft_zoo.root / "tokenizer" / "tokenizer.json")
    assert sft_zoo.manifest["task_info"]["topic"]["splits"]["test"]["n"] == hard.eval_splits["test"]
    # an expert fine-tuned again from the built base is byte-identical
    import shutil

    shutil.copytree(sft_zoo.base, tmp_path / "base")
    (tmp_path / "tasks" / "topic").mkdir(parents=True)
    shutil.copy(sft_zoo.data_file("topic", "train"), tmp_path / "tasks" / "topic" / "train.jsonl")
    info = finetune_expert(str(tmp_path), "topic", "sft-test")
    assert info["sha256"] == sft_zoo.manifest["models"]["experts"]["topic"]["sha256"]


def test_task_vector_geometry_matches_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "xyz"}
    flat_base = torch.cat([base[k].flatten() for k in sorted(base)]).double()
    taus = {t: torch.cat([(experts[t][k] - base[k]).flatten() for k in sorted(base)]).double() for t in "xyz"}
    cos = [float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0)) for a, b in ("xy", "xz", "yz")]
    rel = [float(taus[t].norm() / flat_base.norm()) for t in "xyz"]
    got_cos, got_rel = task_vector_geometry(base, experts)
    assert math.isclose(got_cos, sum(cos) / 3, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(got_rel, sum(rel) / 3, rel_tol=1e-9)


def test_diagnose_report_schema_and_values(sft_zoo: Zoo, tmp_path: Path) -> None:
    report = diagnose(sft_zoo, limit=60)
    out = public_report(report)
    assert tuple(out) == REPORT_KEYS
    assert out["regime"] == "sft" and out["tasks"] == list(sft_zoo.in_domain)
    assert set(out["base"]) == set(out["experts_own"]) == set(sft_zoo.in_domain)
    assert all(0.0 <= v <= 100.0 for v in [*out["base"].values(), *out["experts_own"].values()])
    assert set(out["dare_retention"]) == {"0.9", "0.95", "0.99"}
    assert all(v is None or isinstance(v, float) for v in out["dare_retention"].values())
    assert out["ta_best_lambda"] in (0.3, 0.5, 0.7, 1.0)
    assert 0.0 < out["ta_normalized"] <= 1.5 and -1.0 <= out["task_vector_cosine_mean"] <= 1.0
    assert 0.0 < out["task_vector_rel_norm"] < 1.0
    # the retention is the mean of each expert's (pruned - base) / (expert - base), from the measured accuracies
    dare = report["details"]["dare"]
    ratios = [(dare[t]["0.9"] - out["base"][t]) / (out["experts_own"][t] - out["base"][t])
              for t in out["tasks"] if out["experts_own"][t] > out["base"][t]]
    assert out["dare_retention"]["0.9"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-3)
    ta = report["details"]["ta"]
    best = max(ta.values())
    assert ta[str(out["ta_best_lambda"])] == best
    assert out["ta_normalized"] == pytest.approx(best / (sum(out["experts_own"].values()) / 3), abs=1e-3)
    # an expert pruned at p = 0.99 keeps 1 % of its task vector: it cannot do better than at p = 0.9 by much
    # on every task at once (a sanity check that the drop rate reaches the engine)
    assert sum(dare[t]["0.99"] for t in out["tasks"]) < sum(dare[t]["0.9"] for t in out["tasks"]) + 15


def test_diagnose_command_writes_the_json(sft_zoo: Zoo, tmp_path: Path) -> None:
    out = tmp_path / "regime.json"
    result = CliRunner().invoke(main, ["zoo", "diagnose", "zoo:sft-test", "--limit", "40", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "SFT-regime premises" in result.output and "DARE retention" in result.output
    data = json.loads(out.read_text())
    assert tuple(data) == REPORT_KEYS and data["regime"] == "sft"
    bad = CliRunner().invoke(main, ["zoo", "diagnose", str(tmp_path)])
    assert bad.exit_code == 2 and "is not a mergeflow zoo" in bad.output
