"""Models loaded from several threads at once (pipeline tasks on a thread runner) come out whole, and leave
transformers' class-level functions as they were."""

from __future__ import annotations

import threading

from transformers import PreTrainedModel

from mergeflow.importance.regmean import linear_layers
from mergeflow.transformers_io import load_causal_lm


def test_concurrent_loads_keep_tied_heads(families):
    _, experts = families("gpt2")
    original = PreTrainedModel.tie_weights
    errors: list[BaseException] = []

    def load_many() -> None:
        try:
            for path in experts * 3:
                model = load_causal_lm(path)
                assert linear_layers(model)[1] == ["lm_head"]  # the head is the embedding, not a meta tensor
        except BaseException as e:  # reported below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=load_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert PreTrainedModel.tie_weights is original
    model = load_causal_lm(experts[0])
    assert model.lm_head.weight is model.transformer.wte.weight
