"""Pre-training of the zoo's base and full fine-tuning of its experts, reproducible bit for bit on one machine.

Rebuilds are byte-identical because every source of variation is pinned: a fixed thread count (float sums are
reduced in a thread-dependent order), ``torch.use_deterministic_algorithms``, the initial weights from
``torch.manual_seed``, batches read in file order, and no dropout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from mergeflow import transformers_io
from mergeflow.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class Schedule:
    """AdamW with linear warm-up then cosine decay to ``final_lr_ratio`` × ``lr``."""

    steps: int
    batch_size: int
    lr: float
    warmup: float  # fraction of the steps
    final_lr_ratio: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def model_config(shape: ModelShape, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attention_dropout=0.0,
        use_cache=False,
    )


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Pin the thread count and deterministic kernels for the duration, then restore the caller's settings."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _optimizer(
    model: torch.nn.Module, sched: Schedule
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # No weight decay on norms (1-D gains): decaying them toward 0 only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": sched.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=sched.lr,
        betas=sched.betas,
    )
    warm = max(1, round(sched.warmup * sched.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, sched.steps - warm)
        return sched.final_lr_ratio + (1 - sched.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, lr_sched, sched: Schedule, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), sched.clip)
    opt.step()
    lr_sched.step()


def pretrain(
    config: LlamaConfig,
    blocks: torch.Tensor,
    sched: Schedule,
    seed: int,
    *,
    desc: str = "pre-train",
    progress: bool = True,
    report: Callable[[int, float], None] | None = None,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Next-token training on packed blocks, ``sched.batch_size`` blocks per step in order. Returns model and losses.
    ``report(step, loss)`` is called after every step (for progress lines where a bar cannot show)."""
    torch.manual_seed(seed)
    with transformers_io.exclusive():
        model = LlamaForCausalLM(config)
    model.train()
    opt, lr_sched = _optimizer(model, sched)
    losses: list[float] = []
    bar = tqdm(range(sched.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        batch = blocks[step * sched.batch_size : (step + 1) * sched.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        _step(model, opt, lr_sched, sched, loss)
        losses.append(loss.item())
        if report is not None:
            report(step, losses[-1])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, losses


def encode_example(vocab: dict[str, int], context: str, answer: str) -> tuple[list[int], int]:
    """``<s> context answer`` as ids, and where the answer starts (the loss covers the answer only)."""
    ctx = [BOS_ID, *(vocab[w] for w in context.split())]
    return ctx + [vocab[w] for w in answer.split()], len(ctx)


def answer_batch(examples: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels that are -100 everywhere but on answer tokens."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def finetune(
    base: LlamaForCausalLM,
    examples: Sequence[tuple[list[int], int]],
    sched: Schedule,
    *,
    desc: str = "fine-tune",
    progress: bool = True,
    report: Callable[[int, float], None] | None = None,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Full fine-tuning of a copy of ``base`` on answer tokens, ``sched.batch_size`` examples per step in order."""
    if len(examples) < sched.steps * sched.batch_size:
        raise ValueError(f"{desc}: {len(examples)} examples for {sched.steps} steps × {sched.batch_size}")
    with transformers_io.exclusive():
        model = LlamaForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    model.train()
    opt, lr_sched = _optimizer(model, sched)
    losses: list[float] = []
    bar = tqdm(range(sched.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        ids, mask, labels = answer_batch(examples[step * sched.batch_size : (step + 1) * sched.batch_size])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        _step(model, opt, lr_sched, sched, loss)
        losses.append(loss.item())
        if report is not None:
            report(step, losses[-1])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, losses
