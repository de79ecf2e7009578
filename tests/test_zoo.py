"""The offline zoo: seeded task data, a tokenizer covering every word, byte-identical rebuilds, experts that learn."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergeflow.errors import ZooError
from mergeflow.zoo import SIZES, TASKS, Zoo, build_zoo, default_zoo_dir
from mergeflow.zoo.build import ZooSize, finetune_expert, sha256_file
from mergeflow.zoo.corpus import pretraining_blocks
from mergeflow.zoo.tasks import SPLITS, generate_split, generate_task
from mergeflow.zoo.tokenizer import BOS_ID, EOS_ID, UNK_ID, build_tokenizer, zoo_vocab
from mergeflow.zoo.train import ModelShape, Schedule, deterministic, model_config, pretrain
from tests.zoo_fixtures import test_zoo  # noqa: F401

SMALL = {"test": 60, "validation": 40, "calib": 20, "fewshot": 8, "train": 200}


# ----------------------------------------------------------------------------------------------- task data


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_data_is_a_function_of_the_seed(task: str) -> None:
    a = generate_task(task, SMALL, seed=0)
    assert a == generate_task(task, SMALL, seed=0)
    assert a["test"] != generate_task(task, SMALL, seed=1)["test"]
    # Each split has its own RNG: the test split does not depend on the other splits' sizes.
    assert generate_split(task, "test", 60, seed=0) == a["test"]
    assert generate_task(task, {**SMALL, "train": 50}, seed=0)["test"] == a["test"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rows_are_well_formed_and_labels_balanced(task: str) -> None:
    rows = generate_split(task, "test", 2000, seed=3)
    n_choices = len(rows[0]["choices"])
    counts = [0] * n_choices
    for row in rows:
        assert set(row) == {"context", "choices", "gold"}
        assert row["context"] and row["context"] == row["context"].strip()
        assert len(row["choices"]) == n_choices and len(set(row["choices"])) == n_choices
        assert all(c and c == c.strip() for c in row["choices"])
        counts[row["gold"]] += 1
    # every answer is gold about equally often, so a constant answer scores chance
    assert min(counts) > 0.6 * len(rows) / n_choices
    assert max(counts) < 1.4 * len(rows) / n_choices


@pytest.mark.parametrize("task", sorted(t for t, spec in TASKS.items() if spec.disjoint))
def test_splits_are_disjoint_where_the_task_allows(task: str) -> None:
    # (nli, reverse_nli and arith ask about a small fact table: there, overlap is unavoidable)
    data = generate_task(task, SIZES["test"].split_sizes(), seed=0)
    assert {s: len(rows) for s, rows in data.items()} == SIZES["test"].split_sizes()
    contexts = {split: {r["context"] for r in rows} for split, rows in data.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not contexts[a] & contexts[b], (task, a, b)


def test_tokenizer_covers_every_word_and_splits_at_the_answer() -> None:
    tok = build_tokenizer()
    vocab = zoo_vocab()
    assert tok.get_vocab() == vocab and len(vocab) == len(set(vocab.values()))
    for task in TASKS:
        for row in generate_split(task, "test", 300, seed=5):
            ctx = tok(row["context"]).input_ids
            assert ctx[0] == BOS_ID and UNK_ID not in ctx
            for choice in row["choices"]:
                ids = tok(row["context"] + " " + choice).input_ids
                # lm-eval cuts the joined string at the context's token count: the answer never shares a token
                assert ids[: len(ctx)] == ctx and tok.decode(ids[len(ctx) :]) == choice, (task, choice)
                assert UNK_ID not in ids
    blocks = pretraining_blocks(
        vocab, n_blocks=200, block_len=64, mix={"generic": 0.5, "prompt": 0.4, "labelled": 0.1},
        prompt_tasks=list(TASKS), labelled_tasks=list(TASKS), label_noise=0.5, seed=0, bos_id=BOS_ID, eos_id=EOS_ID,
    )  # fmt: skip
    assert UNK_ID not in blocks and int(blocks.max()) < len(vocab)
    # the corpus maps words to ids directly: the same ids as the tokenizer
    words = [i for i in blocks[0].tolist() if i not in (BOS_ID, EOS_ID)]
    assert tok(tok.decode(words)).input_ids == [BOS_ID, *words]


# ----------------------------------------------------------------------------------------------- built zoo


def test_zoo_layout_hashes_and_task_files(test_zoo: Zoo) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = test_zoo.manifest
    assert (test_zoo.size, test_zoo.seed) == ("test", 0)
    assert test_zoo.in_domain == SIZES["test"].in_domain and test_zoo.ood == SIZES["test"].ood
    models = {"base": m["models"]["base"], **m["models"]["experts"]}
    assert set(models) == {"base", *test_zoo.in_domain}
    for info in models.values():
        folder = test_zoo.root / info["path"]
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
        assert sha256_file(folder / "model.safetensors") == info["sha256"]
    for task in test_zoo.tasks:
        for split, info in m["task_info"][task]["splits"].items():
            path = test_zoo.data_file(task, split)
            assert sha256_file(path) == info["sha256"]
            assert len(path.read_text().splitlines()) == info["n"]
        assert m["task_info"][task]["splits"]["calib"]["n"] >= 100
        assert m["task_info"][task]["splits"]["fewshot"]["n"] >= 5
    # task files are relative to the zoo: nothing absolute is written into them
    for yml in test_zoo.tasks_dir.glob("*.yaml"):
        text = yml.read_text()
        assert str(test_zoo.root) not in text and "/tmp" not in text, yml
    group = yaml.safe_load((test_zoo.tasks_dir / "zoo.yaml").read_text())
    assert group["task"] == [f"zoo_{t}" for t in test_zoo.in_domain]
    # standard HF folders
    model = AutoModelForCausalLM.from_pretrained(test_zoo.experts["nli"])
    tok = AutoTokenizer.from_pretrained(test_zoo.experts["nli"])
    assert model.config.vocab_size == len(tok) == m["vocab_size"]
    assert m["timings"]["total_s"] > 0 and m["hparams"]["threads"] == 1


def test_data_on_disk_is_the_generated_data(test_zoo: Zoo) -> None:  # noqa: F811
    for task in ("topic", "reverse_nli"):
        assert test_zoo.rows(task, "test") == generate_task(task, SIZES["test"].split_sizes(task), seed=0)["test"]


def test_building_again_is_instant_and_guards_other_zoos(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    t0 = time.perf_counter()
    again = build_zoo(test_zoo.root, size="test", seed=0, progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert again.manifest == test_zoo.manifest
    with pytest.raises(ZooError, match="seed 0"):
        build_zoo(test_zoo.root, size="test", seed=1, progress=False)
    with pytest.raises(ZooError, match="unknown zoo size"):
        build_zoo(tmp_path / "z", size="huge")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file.txt").write_text("x")
    with pytest.raises(ZooError, match="not a zoo"):
        build_zoo(tmp_path / "occupied", size="test", progress=False)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "zoo.json").write_text(json.dumps({**test_zoo.manifest, "recipe_sha256": "0" * 64}))
    with pytest.raises(ZooError, match="another version of the test zoo recipe"):
        build_zoo(stale, size="test", seed=0, progress=False)
    with pytest.raises(ZooError, match="is missing"):
        Zoo.load(tmp_path)
    (tmp_path / "zoo.json").write_text("{}")
    with pytest.raises(ZooError, match="not a valid zoo manifest"):
        Zoo.load(tmp_path)


def test_sizes_travel_to_workers_as_json() -> None:
    for size in SIZES.values():
        assert ZooSize.from_json(json.loads(json.dumps(size.to_json()))) == size
        assert size.split_sizes()["calib"] >= 100 and size.split_sizes()["fewshot"] >= 5


def test_default_location_is_under_mergeflow_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path))
    assert default_zoo_dir("test", 3) == tmp_path.resolve() / "zoo" / "test-seed3"


def test_rebuilds_are_byte_identical(test_zoo: Zoo, tmp_path: Path) -> None:  # noqa: F811
    # Fine-tune one expert again from the built base: the same bytes as the zoo's expert.
    shutil.copytree(test_zoo.base, tmp_path / "base")
    (tmp_path / "tasks" / "nli").mkdir(parents=True)
    shutil.copy(test_zoo.data_file("nli", "train"), tmp_path / "tasks" / "nli" / "train.jsonl")
    info = finetune_expert(str(tmp_path), "nli", "test")
    assert info["sha256"] == test_zoo.manifest["models"]["experts"]["nli"]["sha256"]
    # Pre-training (seeded init, packed corpus) twice: identical weights.
    vocab = zoo_vocab()
    sched = Schedule(steps=12, batch_size=8, lr=3e-3, warmup=0.1, final_lr_ratio=0.1, weight_decay=0.1)
    runs = []
    for _ in range(2):
        blocks = pretraining_blocks(
            vocab, n_blocks=96, block_len=32, mix={"generic": 0.6, "prompt": 0.4}, prompt_tasks=["nli"],
            labelled_tasks=[], label_noise=0.0, seed=7, bos_id=BOS_ID, eos_id=EOS_ID,
        )  # fmt: skip
        with deterministic(1):
            model, _ = pretrain(model_config(ModelShape(32, 1, 2, 64), len(vocab)), blocks, sched, 7, progress=False)
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_experts_beat_the_base_on_their_own_task(test_zoo: Zoo) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeflow.evaluation import evaluate

    tok = AutoTokenizer.from_pretrained(test_zoo.base)

    def acc(path: Path) -> dict[str, float]:
        return evaluate(AutoModelForCausalLM.from_pretrained(path), tok, ["zoo", "zoo-ood"], zoo=test_zoo).accuracy

    base = acc(test_zoo.base)
    experts = {task: acc(path) for task, path in test_zoo.experts.items()}
    summary = json.dumps({"base": base, **experts})
    for task in test_zoo.in_domain:
        assert base[task] < TASKS[task].chance + 15, summary  # the base does not know the tasks
        # margins that hold across seeds (measured on seeds 0-4 with 200 test examples per task)
        assert experts[task][task] > base[task] + 20, summary
    assert experts["topic"]["review_topic"] > base["review_topic"] + 15, summary  # the skill transfers out of domain
