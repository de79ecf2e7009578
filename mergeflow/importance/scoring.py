"""Few-shot scoring shared by the estimators (docs/methods.md §1.6): gold-answer probability and answer-token LM loss.

Texts are tokenised the way lm-eval scores them — the prompt and the whole text are encoded separately, the answer
tokens are the tokens of the whole text past the prompt's — so an estimator and the evaluation see the same tokens.
Sequences are right-padded and every score is computed over real answer positions only: padding never enters a score.
All scores are fp32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergeflow.importance.data import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Encoded:
    """A right-padded batch: ids, attention mask and the answer mask over *predicted* positions.

    ``answer_mask[b, j]`` is true when token ``j + 1`` of row ``b`` is an answer token, i.e. when the logits at
    position ``j`` predict an answer token. ``targets[b, j]`` is that token (0 elsewhere).
    """

    input_ids: torch.Tensor      # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    answer_mask: torch.Tensor    # [B, T-1] bool
    targets: torch.Tensor        # [B, T-1] long
    lengths: torch.Tensor        # [B] real tokens per row

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.answer_mask,
                                                self.targets, self.lengths)))

    def select(self, index: torch.Tensor | slice) -> Encoded:
        """The rows in ``index`` (a slice, or indices in any order), trimmed to their own longest sequence."""
        width = int(self.lengths[index].max())
        return Encoded(self.input_ids[index, :width], self.attention_mask[index, :width],
                       self.answer_mask[index, :width - 1], self.targets[index, :width - 1], self.lengths[index])

    def rows(self, start: int, stop: int) -> Encoded:
        """Rows start:stop, trimmed to their own longest sequence."""
        return self.select(slice(start, stop))


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, max_length: int | None = None,
           answer_only: bool = True) -> Encoded:
    """Tokenise prompt + delimiter + answer; mark the answer tokens (every token when ``answer_only`` is False)."""
    if not examples:
        raise ValueError("no examples to encode")
    whole = tokenizer([ex.text for ex in examples], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    rows, starts = [], []
    for ex, ids, p in zip(examples, whole, prompts):
        start = len(p)
        if ids[:start] != p:  # a token spans the prompt/answer boundary: fall back to separate encodings
            ids = p + tokenizer(ex.delimiter + ex.answer, add_special_tokens=False)["input_ids"]
        if len(ids) <= start:
            raise ValueError(f"empty answer after tokenisation: {ex.answer!r}")
        if max_length is not None and len(ids) > max_length:  # keep the answer, cut the prompt's left side
            cut = len(ids) - max_length
            if cut >= start:
                raise ValueError(f"answer longer than max_length={max_length} tokens")
            ids, start = ids[cut:], start - cut
        if start == 0:
            raise ValueError("an example needs at least one prompt token to condition the answer on")
        rows.append(ids)
        starts.append(start)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    b = len(rows)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    answer = torch.zeros((b, width - 1), dtype=torch.bool)
    for i, (ids, start) in enumerate(zip(rows, starts)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        first = start - 1 if answer_only else 0
        answer[i, first:len(ids) - 1] = True
    targets = torch.where(answer, input_ids[:, 1:], torch.zeros_like(input_ids[:, 1:]))
    return Encoded(input_ids, attention, answer, targets, attention.sum(1))


def batches(enc: Encoded, batch_size: int) -> Iterator[tuple[int, Encoded]]:
    for start in range(0, len(enc), batch_size):
        yield start, enc.rows(start, min(len(enc), start + batch_size))


def answer_logprobs(model: PreTrainedModel, enc: Encoded) -> torch.Tensor:
    """Per predicted position, log p(target) in fp32, zero outside the answer: [B, T-1]. Keeps the graph."""
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)
    return picked * enc.answer_mask


def gold_probability(model: PreTrainedModel, enc: Encoded, *, normalize: bool = True,
                     batch_size: int = 64) -> torch.Tensor:
    """P(gold | prompt) per example: length-normalised ``exp(mean log p)`` (default) or ``exp(sum log p)``."""
    out = []
    with torch.no_grad():
        for _, b in batches(enc, batch_size):
            lp = answer_logprobs(model, b.to(model.device)).sum(1)
            n = b.answer_mask.sum(1).to(lp.device)
            out.append(torch.exp(lp / n if normalize else lp).cpu())
    return torch.cat(out)


def lm_loss(model: PreTrainedModel, enc: Encoded) -> torch.Tensor:
    """Token-mean cross-entropy over the marked tokens, per example: [B] fp32, differentiable."""
    lp = answer_logprobs(model, enc)
    return -(lp.sum(1) / enc.answer_mask.sum(1).clamp(min=1))


def mean_lm_loss(model: PreTrainedModel, enc: Encoded, *, batch_size: int = 64) -> float:
    """The mean over examples of :func:`lm_loss`, without gradients."""
    total = 0.0
    with torch.no_grad():
        for _, b in batches(enc, batch_size):
            total += float(lm_loss(model, b.to(model.device)).sum())
    return total / len(enc)
