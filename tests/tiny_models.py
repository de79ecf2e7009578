"""Tiny real Hugging Face models for tests: Llama, Mistral (GQA), Qwen2 (tied embeddings, qkv biases), GPT-2 (Conv1D),
and the families of ``ALL_FAMILIES``: Qwen3 (q/k norms), Gemma-2 and Gemma-3 text (extra post-norms, tied, scaled
embeddings), Phi-3 (fused qkv and gate/up), Phi-2 (parallel attention/MLP, biases), GPT-NeoX and Falcon with the new
decoder architecture (fused interleaved qkv, parallel residual; Falcon with grouped kv heads), OLMo-2 (post-norm
blocks), Mixtral and Qwen3-MoE (routed experts, which transformers 5 fuses into one parameter per projection on load).

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
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 96
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
# every family the importance estimators are checked on (tests/test_family_matrix.py)
ALL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi", "gpt_neox", "falcon",
                "olmo2", "gpt2", "mixtral", "qwen3_moe")

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
    # hidden 32, 2 blocks, 4 heads of 8; intermediate 48 (never 2× hidden, so no matrix has a fused one's shape)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}
    if family == "qwen3":
        return Qwen3Config(intermediate_size=48, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                           **sizes, **common)
    if family == "gemma2":
        return Gemma2Config(intermediate_size=48, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                            sliding_window=16, tie_word_embeddings=True, **sizes, **common)
    if family == "gemma3":
        return Gemma3TextConfig(intermediate_size=48, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=16, tie_word_embeddings=True, **sizes, **common)
    if family == "phi3":
        return Phi3Config(intermediate_size=48, num_key_value_heads=4, tie_word_embeddings=False, **sizes, **common)
    if family == "phi":
        return PhiConfig(intermediate_size=48, tie_word_embeddings=False, **sizes, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(intermediate_size=48, use_parallel_residual=True, tie_word_embeddings=False, **sizes,
                             **common)
    if family == "falcon":
        return FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                            new_decoder_architecture=True, ffn_hidden_size=48, bias=False, alibi=False,
                            max_position_embeddings=64, tie_word_embeddings=True, **common)
    if family == "olmo2":
        return Olmo2Config(intermediate_size=48, num_key_value_heads=4, tie_word_embeddings=False, **sizes, **common)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=48, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=None, tie_word_embeddings=False, **sizes, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=2, head_dim=8,
                              num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                              tie_word_embeddings=False, **sizes, **common)
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
    config = make_config(family, vocab_size)
    model_class = _MODEL_CLASSES.get(family)
    model = model_class(config) if model_class is not None else AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_expert(base: Path, path: Path, *, seed: int, scale: float = 0.02) -> Path:
    """Copy ``base`` to ``path`` with every floating-point parameter perturbed by seeded Gaussian noise."""
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
