"""Tiny real Hugging Face models for tests: Llama, Mistral (GQA), Qwen2 (tied embeddings, qkv biases), GPT-2 (Conv1D).

Each family is built with transformers' own config and model classes, randomly initialised from a seed and saved with
``save_pretrained`` (safetensors), together with a small fast tokenizer. Experts are the base plus a seeded random
perturbation, so task vectors are small, dense and different per expert, as they are after fine-tuning.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging fine tuned language models with task vectors",
    "alice went to the kitchen and cooked the soup",
    "nine plus three mod ten equals two",
] * 8


def write_jsonl(path: Path, rows) -> Path:
    """A task file of ``(prompt, answer)`` pairs, one JSON object a line, as the estimators' data loader reads it."""
    import json

    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


@functools.cache
def _trained(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40],
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer, trained once per process: BPE training breaks ties between equally frequent
    pairs differently from run to run, and the models of a family share one tokenizer, as fine-tunes of one base
    do (experts that add tokens are built by :func:`make_expert_with_tokens`)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>"
    )


def make_config(family: str, vocab_size: int = VOCAB):
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, **common)
    if family == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                             tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True, **common)
    raise ValueError(f"unknown family {family!r}")


_MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def make_model(family: str, path: Path, *, seed: int = 0, vocab_size: int = VOCAB,
               dtype: torch.dtype = torch.float32) -> Path:
    """Build and save a randomly initialised model of ``family`` at ``path``."""
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](make_config(family, vocab_size))
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_expert(base: Path, path: Path, *, seed: int, scale: float = 0.02) -> Path:
    """Copy ``base`` to ``path`` with every floating-point parameter perturbed by seeded Gaussian noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_family(family: str, root: Path, *, n_experts: int = 3, dtype: torch.dtype = torch.float32,
                vocab_size: int = VOCAB) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts of one family under ``root``."""
    base = make_model(family, root / "base", seed=0, vocab_size=vocab_size, dtype=dtype)
    experts = [make_expert(base, root / f"expert{i}", seed=100 + i) for i in range(n_experts)]
    return base, experts


CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_expert_with_tokens(base: Path, path: Path, *, seed: int, special: tuple[str, ...] = (),
                            plain: tuple[str, ...] = (), chat_template: str | None = None,
                            scale: float = 0.02) -> Path:
    """An expert fine-tuned from ``base`` that added tokens, as chat and tool fine-tunes do: the base's tokenizer
    plus ``special`` (special) and ``plain`` (ordinary added) tokens, the embeddings (and an untied head) resized
    by transformers for them, then every weight perturbed by seeded noise; ``chat_template`` saved with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if special:
        tok.add_tokens(list(special), special_tokens=True)
    if plain:
        tok.add_tokens(list(plain))
    if chat_template is not None:
        tok.chat_template = chat_template
    torch.manual_seed(seed)  # the new rows' initialisation
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
