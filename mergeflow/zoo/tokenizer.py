"""The zoo's word-level tokenizer: one token per word of the task lexicons, saved as a transformers fast tokenizer.

A word-level vocabulary guarantees that a context and its answer never share a token (lm-eval splits the joined
string at the context's token count) and that every task word has its own embedding row. The post-processor
prepends ``<s>``, and transformers' and lm-eval's default encoding both keep it, so models are trained on exactly
the ids the harness feeds them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mergeflow.errors import ZooError
from mergeflow.zoo.tasks import template_words

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def zoo_vocab() -> dict[str, int]:
    """Specials first, then every zoo word in sorted order: the same vocabulary on every machine."""
    words = sorted(template_words())
    return {token: i for i, token in enumerate((*SPECIALS, *words))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=zoo_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=128,
    )


def check_coverage(vocab: dict[str, int], texts: Iterable[str], where: str) -> None:
    """Raise ``ZooError`` naming the first words of ``texts`` the vocabulary lacks (they would become ``<unk>``)."""
    missing: set[str] = set()
    for text in texts:
        missing.update(w for w in text.split() if w not in vocab)
    if missing:
        raise ZooError(f"{where}: words missing from the zoo vocabulary: {sorted(missing)[:20]}")
