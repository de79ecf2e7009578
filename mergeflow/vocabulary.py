"""Experts whose tokenizers differ: the output vocabulary, and each input's embedding and head rows aligned to it.

``tokenizer_source`` (or mergekit's ``tokenizer: {source, tokens, pad_to_multiple_of}``) names the output tokenizer:

* ``base`` — the base model's tokenizer (the first model's without a base);
* ``union`` — the base's tokenizer plus every token of the other inputs it lacks, in input order, then every input's
  added tokens (special or not) with the settings of their first appearance;
* a model reference — that model's tokenizer (an input or any other checkpoint).

Tokens named under ``tokenizer.tokens`` are added when the output lacks them. The output has one row per token, padded
to a multiple of ``pad_to_multiple_of`` with the mean of each input's token rows. Every vocabulary tensor (embedding,
untied head) of every input, base included, is re-indexed by token before the merge: a token the input has keeps its
own row (unless ``force``); a token it lacks takes a default row, which is (mergekit 0.1.5's rules, in order): the
row that the token's ``tokens`` entry names (``{kind: zero}``, a model, or ``{kind: model_token, model, token|token_id}``);
the only input that has it; the base's row when the base has it; else the mean over the inputs that have it; zeros
when none has it. So a token one expert added reaches the output with that expert's row whatever the merge method.

``mergekit_compat`` reproduces mergekit's vocabulary, ids and rows exactly, with the inputs in the recipe's order
where mergekit's is arbitrary (it orders the models of a union by hash, which varies from run to run). Paper mode
takes the experts in the engine's canonical order (by content) for the union's new tokens and the averaged rows,
so listing the experts differently gives the same tokenizer and the same model. Everything is decided from the
tokenizers and the safetensors headers, before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mergeflow.architecture import Architecture
from mergeflow.checkpoints import Snapshot
from mergeflow.errors import CheckpointError, IncompatibleModelsError, RecipeError
from mergeflow.recipe import Recipe
from mergeflow.tokenizer_io import load_tokenizer, tokenizer_digest

if TYPE_CHECKING:
    pass

def vocabulary_tensors(arch: Architecture) -> list[str]:
    """The tensors indexed by token on dim 0: the embedding and an untied head (not their biases)."""
    return [n for n, r in arch.tensors.items() if r.kind in ("embed", "lm_head") and not r.is_bias]


def chat_template_of(folders: Sequence[Path], *, trust_remote_code: bool = False) -> str | None:
    """The chat template most of these tokenizers share (mergekit's ``chat_template: auto``; the first one seen
    wins a tie), or None when none has one."""
    counts: dict[str, int] = {}
    for folder in folders:
        template = load_tokenizer(folder, trust_remote_code=trust_remote_code).chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            counts[template.strip()] = counts.get(template.strip(), 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equal counts


# ----------------------------------------------------------------------------------------------- the recipe side


@dataclass(frozen=True)
class TokenRule:
    """Where the default row of one token comes from (a ``tokenizer.tokens`` entry, resolved to input indices)."""

    kind: str                     # "zero" | "model" (the input's row for this token) | "model_token" (a given row)
    model: int | None = None      # input index (plan order: base first, then the experts)
    token: str | None = None      # model_token: the source token, looked up in that input's own vocabulary
    token_id: int | None = None   # model_token: the source row
    force: bool = False           # use the default even for inputs that have the token


class MergeInput(Protocol):
    """An opened input of a merge (the engine's ``streaming.Input``): its snapshot and its identity for ordering."""

    snapshot: Snapshot
    rng_id: str


@dataclass
class VocabInput:
    """One input of the merge as the vocabulary sees it."""

    role: str                       # "base" | "model[i]"
    reference: str
    tokenizer_path: Path | None     # None: the input has no tokenizer files and shares the base's (as in mergekit)
    vocab_size: int                 # its config's vocab_size, bounded by its embedding rows
    rows: int                       # its embedding rows


# ------------------------------------------------------------------------------------------------- the alignment


@dataclass
class VocabularyPlan:
    """The output tokenizer and, per input, which of its rows each output token takes (``sources[i][t]``: input
    i's row of output token t, or −1 when input i lacks it or a forced rule replaces it)."""

    tokenizer: Any                      # the output tokenizer (transformers), saved beside the merged weights
    copy_from: Path | None              # a tokenizer folder whose files are the output's unchanged (else: save)
    n_tokens: int                       # tokens of the output vocabulary
    rows: int                           # output rows (n_tokens padded to pad_to_multiple_of)
    sources: list[torch.Tensor]         # per input: [n_tokens] long, own row or −1
    average: torch.Tensor               # token ids whose default is the mean over the inputs that have them
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]]  # input → (token ids, its rows) for copied defaults
    zeros: torch.Tensor                 # token ids whose default is zero
    sum_order: list[int]                # the order in which averaged rows are summed
    summary: list[str] = field(default_factory=list)  # what the alignment does, for `mergeflow check`
    identity: bool = False              # every input already has exactly the output's rows: nothing to align

    def digest(self) -> str:
        """Identifies the alignment (which rows each input's tensors take), for cache keys."""
        h = hashlib.sha256(f"{self.n_tokens}:{self.rows}:{self.sum_order}".encode())
        for t in [*self.sources, self.average, self.zeros]:
            h.update(t.numpy().tobytes() + b"|")
        for i in sorted(self.copies):
            ids, rows = self.copies[i]
            h.update(f"{i}:".encode() + ids.numpy().tobytes() + rows.numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def align(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each input's vocabulary tensor (vocabulary on dim 0; all in one dtype) re-indexed to the output's."""
        if self.identity:
            return list(tensors)
        trailing = tensors[0].shape[1:]
        if any(t.shape[1:] != trailing for t in tensors):
            raise IncompatibleModelsError("vocabulary tensors differ beyond their vocabulary dimension: "
                                          f"{[list(t.shape) for t in tensors]}")
        dtype, device = tensors[0].dtype, tensors[0].device
        defaults = torch.zeros((self.n_tokens, *trailing), dtype=dtype, device=device)
        if self.average.numel():
            ids = self.average.to(device)
            acc = torch.zeros((ids.numel(), *trailing), dtype=dtype, device=device)
            count = torch.zeros(ids.numel(), dtype=torch.long, device=device)
            for i in self.sum_order:
                src = self.sources[i].to(device)[ids]
                have = src >= 0
                acc[have] = acc[have] + tensors[i][src[have]]
                count += have.long()
            for c in sorted(set(count.tolist())):  # mergekit divides each row by its python int count
                sel = count == c
                part = acc[sel]
                part /= c
                acc[sel] = part
            defaults[ids] = acc
        for i, (ids, rows) in self.copies.items():
            defaults[ids.to(device)] = tensors[i][rows.to(device)]
        # zeros: already zero
        out = []
        for i, t in enumerate(tensors):
            src = self.sources[i].to(device)
            new = torch.zeros((self.rows, *trailing), dtype=dtype, device=device)
            own = src >= 0
            new[: self.n_tokens][own] = t[src[own]]
            new[: self.n_tokens][~own] = defaults[~own]
            if self.rows > self.n_tokens:
                new[self.n_tokens:] = torch.mean(new[: self.n_tokens], dim=0)
            out.append(new)
        return out


def _vocab_of(tok: Any, limit: int) -> dict[str, int]:
    """A tokenizer's token → id, without ids at or beyond ``limit`` (tokens the model has no row for)."""
    return {t: i for t, i in tok.get_vocab().items() if i < limit}


def _beyond(tok: Any, limit: int) -> list[str]:
    return sorted((t for t, i in tok.get_vocab().items() if i >= limit), key=lambda t: tok.get_vocab()[t])


def _copy_tokenizer(tok: Any) -> Any:
    """A private copy of a loaded tokenizer (a union adds tokens to it; the input's own must stay as it is)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mergeflow-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        return load_tokenizer(Path(tmp))


def _show(tokens: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(t) for t in tokens[:n])
    return shown + (f" and {len(tokens) - n} more" if len(tokens) > n else "")


def plan_vocabulary(inputs: Sequence[VocabInput], *, source: str, base_index: int | None,
                    source_path: Path | None, source_input: int | None, tokens: dict[str, TokenRule],
                    pad_to_multiple_of: int | None, union_order: Sequence[int], sum_order: Sequence[int],
                    trust_remote_code: bool = False) -> VocabularyPlan:
    """The output vocabulary of ``source`` (``base`` | ``union`` | ``model``) and every input's row sources.

    ``inputs``: the base (if any) first, then the experts. ``base_index``: the base's index, or None without a base
    (the first input then plays the base's part for the tokenizer, never for the default rows, as in mergekit).
    ``source_path``/``source_input``: the tokenizer folder of a ``model`` source, and its input index when it is
    one. ``union_order``: the order the union visits the inputs (the first is the base's tokenizer).
    """
    first = base_index if base_index is not None else 0
    loaded: dict[Path, Any] = {}

    def tokenizer_at(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return loaded[path]

    head = inputs[first]
    if head.tokenizer_path is None:
        raise CheckpointError(f"{head.role} ({head.reference}) has no tokenizer files; tokenizer_source needs the "
                              f"{'base' if base_index is not None else 'first model'}'s tokenizer")
    base_tok = tokenizer_at(head.tokenizer_path)
    extra = _beyond(base_tok, head.vocab_size)
    if extra:
        raise IncompatibleModelsError(
            f"{head.role} ({head.reference}): its tokenizer has {len(extra)} token(s) with ids at or beyond its "
            f"vocab_size {head.vocab_size} ({_show(extra)}); mergeflow does not strip them — save the tokenizer "
            "without them, or resize the model's embeddings")
    vocabs: list[dict[str, int]] = []
    shared: list[int] = []
    for i, inp in enumerate(inputs):
        if inp.tokenizer_path is None:
            shared.append(i)
            vocabs.append(_vocab_of(base_tok, head.vocab_size))
        else:
            vocabs.append(_vocab_of(tokenizer_at(inp.tokenizer_path), inp.vocab_size))

    summary: list[str] = []
    copy_from: Path | None = None
    if source == "base":
        out_tok = base_tok
        copy_from = head.tokenizer_path
        summary.append(f"tokenizer_source base: the output takes the {head.role}'s tokenizer "
                       f"({len(vocabs[first])} tokens)")
    elif source == "union":
        out_tok, added = _union(base_tok, inputs, union_order, tokenizer_at)
        copy_from = head.tokenizer_path if not added else None
        summary.append(f"tokenizer_source union: the {head.role}'s {len(vocabs[first])} tokens plus {len(added)} "
                       f"from the other models{': ' + _show(added) if added else ''}")
    else:
        if source_input is not None:
            source_path = inputs[source_input].tokenizer_path
            if source_path is None:
                raise CheckpointError(f"tokenizer_source: {inputs[source_input].role} "
                                      f"({inputs[source_input].reference}) has no tokenizer files")
        assert source_path is not None
        out_tok = tokenizer_at(source_path)
        copy_from = source_path
        named = inputs[source_input].role if source_input is not None else str(source_path)
        summary.append(f"tokenizer_source: the output takes the tokenizer of {named} ({len(out_tok.get_vocab())} "
                       "tokens)")
    new_tokens = [t for t in tokens if t not in out_tok.get_vocab()]
    if new_tokens:
        if any(out_tok is x for x in loaded.values()):  # an input's own tokenizer: add to a private copy
            out_tok = _copy_tokenizer(out_tok)
        for t in new_tokens:  # one at a time, in the recipe's order, as mergekit adds them
            out_tok.add_tokens(t)
        copy_from = None
        summary.append(f"tokenizer.tokens adds {len(new_tokens)} token(s): {_show(new_tokens)}")
    vocab = out_tok.get_vocab()
    n_tokens = len(vocab)
    if sorted(vocab.values()) != list(range(n_tokens)):
        raise IncompatibleModelsError(f"the output tokenizer's ids are not 0..{n_tokens - 1} (it has gaps); "
                                      "cannot lay out its embedding rows")
    rows = n_tokens
    if pad_to_multiple_of and n_tokens % pad_to_multiple_of:
        rows = (n_tokens // pad_to_multiple_of + 1) * pad_to_multiple_of
    by_id = sorted(vocab, key=vocab.__getitem__)

    sources = [torch.tensor([v.get(t, -1) for t in by_id], dtype=torch.long) for v in vocabs]
    present = torch.stack([s >= 0 for s in sources])  # [inputs, n_tokens]
    n_present = present.sum(0).tolist()
    # only tokens some input lacks, or with a forced rule, need a default row (a 150k vocabulary: a few hundred)
    forced_ids = {vocab[t] for t, r in tokens.items() if r.force and t in vocab}
    candidates = sorted(set((~present.all(0)).nonzero().flatten().tolist()) | forced_ids)

    # the default row of every token that some input lacks (or whose rule is forced)
    average: list[int] = []
    copies: dict[int, tuple[list[int], list[int]]] = {}
    zeros: list[int] = []
    forced: list[int] = []
    donors: dict[int, int] = {}
    from_base = 0
    for tid in candidates:
        t = by_id[tid]
        rule = tokens.get(t)
        if rule is not None:
            if rule.force:
                forced.append(tid)
            if rule.kind == "zero":
                zeros.append(tid)
            elif rule.kind == "model":
                assert rule.model is not None
                row = int(sources[rule.model][tid])
                if row < 0:
                    raise RecipeError(f"tokenizer.tokens[{t!r}].source: {inputs[rule.model].role} "
                                      f"({inputs[rule.model].reference}) has no token {t!r}")
                copies.setdefault(rule.model, ([], []))[0].append(tid)
                copies[rule.model][1].append(row)
            else:
                assert rule.model is not None
                row = rule.token_id if rule.token is None else vocabs[rule.model].get(rule.token, -1)
                if rule.token is not None and row < 0:
                    raise RecipeError(f"tokenizer.tokens[{t!r}].source.token: {inputs[rule.model].role} "
                                      f"({inputs[rule.model].reference}) has no token {rule.token!r}")
                assert row is not None
                if not 0 <= row < inputs[rule.model].rows:
                    raise RecipeError(f"tokenizer.tokens[{t!r}].source.token_id: {row} is outside the "
                                      f"{inputs[rule.model].rows} rows of {inputs[rule.model].role}")
                copies.setdefault(rule.model, ([], []))[0].append(tid)
                copies[rule.model][1].append(row)
            continue
        k = n_present[tid]
        if k == 1:
            donor = int(present[:, tid].nonzero()[0])
            donors[tid] = donor
            copies.setdefault(donor, ([], []))[0].append(tid)
            copies[donor][1].append(int(sources[donor][tid]))
        elif k == 0:
            zeros.append(tid)
        elif base_index is not None and bool(present[base_index, tid]):
            from_base += 1
            copies.setdefault(base_index, ([], []))[0].append(tid)
            copies[base_index][1].append(int(sources[base_index][tid]))
        else:
            average.append(tid)
    for tid in forced:
        for s in sources:
            s[tid] = -1

    identity = (not forced and rows == n_tokens
                and all(inp.rows == n_tokens and torch.equal(s, torch.arange(n_tokens))
                        for inp, s in zip(inputs, sources)))
    # what `mergeflow check` says
    for i, (inp, v) in enumerate(zip(inputs, vocabs)):
        lacks = [t for t in by_id if t not in v]
        moved = sum(1 for t in by_id if t in v and v[t] != vocab[t])
        dropped = [t for t in v if t not in vocab]
        note = "shares the base's tokenizer (no tokenizer files); " if i in shared else ""
        parts = [f"{inp.rows} rows → {rows}"]
        if lacks:
            parts.append(f"lacks {len(lacks)} output token(s) ({_show(lacks)})")
        if moved:
            parts.append(f"{moved} token(s) at other ids, moved")
        if dropped:
            parts.append(f"{len(dropped)} of its tokens are not in the output ({_show(dropped)}), dropped")
        summary.append(f"{inp.role}: {note}{'; '.join(parts)}")
    if donors:
        by_donor: dict[int, list[str]] = {}
        for tid, d in donors.items():
            by_donor.setdefault(d, []).append(by_id[tid])
        for d, toks in by_donor.items():
            summary.append(f"{len(toks)} token(s) only {inputs[d].role} has take its rows in every model: "
                           f"{_show(toks)}")
    if from_base:
        summary.append(f"{from_base} token(s) some models lack take the base's rows there")
    if average:
        summary.append(f"{len(average)} token(s) the base lacks take the mean of the models that have them: "
                       f"{_show([by_id[t] for t in average])}")
    auto_zero = [by_id[t] for t in zeros if by_id[t] not in tokens]
    if auto_zero:
        summary.append(f"{len(auto_zero)} token(s) no model has get zero rows: {_show(auto_zero)}")
    if tokens:
        summary.append(f"{len(tokens)} token(s) follow their tokenizer.tokens rule")
    if rows > n_tokens:
        summary.append(f"{rows - n_tokens} padding row(s) (pad_to_multiple_of {pad_to_multiple_of}) take each "
                       "model's mean token row")
    if identity:
        summary.append("every model already has the output's rows in order: nothing to realign")

    return VocabularyPlan(
        tokenizer=out_tok, copy_from=copy_from, n_tokens=n_tokens, rows=rows, sources=sources,
        average=torch.tensor(average, dtype=torch.long),
        copies={i: (torch.tensor(ids, dtype=torch.long), torch.tensor(r, dtype=torch.long))
                for i, (ids, r) in copies.items()},
        zeros=torch.tensor(zeros, dtype=torch.long), sum_order=list(sum_order), summary=summary,
        identity=identity)


def input_index(recipe: Recipe, inputs: Sequence[MergeInput], ref: str) -> int | None:
    """The index among ``inputs`` of the model a recipe names by ``ref`` (as written or resolved), else None."""
    wanted = {ref, recipe.resolve_reference(ref)}
    for k, i in enumerate(inputs):
        if i.snapshot.reference in wanted or recipe.resolve_reference(i.snapshot.reference) in wanted:
            return k
    return None


def recipe_vocabulary(recipe: Recipe, inputs: Sequence[MergeInput], vocab_inputs: list[VocabInput],
                      has_base: bool, tokenizer: Snapshot | None) -> VocabularyPlan:
    """The output vocabulary of the recipe's tokenizer_source / tokenizer section over the plan's inputs."""
    source = recipe.vocabulary_source
    assert source is not None
    spec = recipe.tokenizer
    rules: dict[str, TokenRule] = {}
    for token, entry in (spec.tokens.items() if spec is not None else ()):
        where = f"tokenizer.tokens[{token!r}].source"
        src = entry.source
        if isinstance(src, str):
            k = input_index(recipe, inputs, src)
            if k is None:
                raise RecipeError(f"{where}: {src!r} is not one of the merge's models")
            rules[token] = TokenRule("model", k, force=entry.force)
        elif src.kind == "zero":
            rules[token] = TokenRule("zero", force=entry.force)
        else:
            k = input_index(recipe, inputs, src.model)
            if k is None:
                raise RecipeError(f"{where}.model: {src.model!r} is not one of the merge's models")
            rules[token] = TokenRule("model_token", k, src.token, src.token_id, entry.force)
    source_input = source_path = None
    kind = source if source in ("base", "union") else "model"
    if kind == "model":
        source_input = input_index(recipe, inputs, source)
        if source_input is None:
            if tokenizer is None:
                raise RecipeError(f"tokenizer_source: {source!r} is not among the merge's inputs and was not "
                                  "resolved")
            source_path = tokenizer.model_folder  # a LoRA adapter: its base's tokenizer
    n = len(inputs)
    experts = list(range(1, n)) if has_base else list(range(n))
    if recipe.mergekit_compat:
        order = experts
        # mergekit sums in its config's order: the base where `models` lists it, else last
        listed = [m.model for m in recipe.models]
        sum_order = []
        k = iter(experts)
        for ref in listed:
            sum_order.append(0 if has_base and ref == recipe.base_model else next(k))
        if has_base and 0 not in sum_order:
            sum_order.append(0)
    else:
        order = sorted(experts, key=lambda j: inputs[j].rng_id)
        sum_order = ([0] if has_base else []) + order
    union_order = [0] + [j for j in order if j != 0]  # the base's tokenizer (the first model's without one) first
    return plan_vocabulary(vocab_inputs, source=kind, base_index=0 if has_base else None, source_path=source_path,
                           source_input=source_input, tokens=rules,
                           pad_to_multiple_of=spec.pad_to_multiple_of if spec is not None else None,
                           union_order=union_order, sum_order=sum_order,
                           trust_remote_code=recipe.trust_remote_code)


def _union(base_tok: Any, inputs: Sequence[VocabInput], order: Sequence[int],
           tokenizer_at: Any) -> tuple[Any, list[str]]:
    """The base's tokenizer plus, visiting the inputs in ``order``: every token (below the input's vocab_size) it
    lacks, as a plain added token; then every input's added tokens with their first-seen settings."""
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for i in order:
        inp = inputs[i]
        if inp.tokenizer_path is None and i != order[0]:
            continue  # no tokenizer of its own: it adds nothing
        tok = base_tok if i == order[0] else tokenizer_at(inp.tokenizer_path)
        limit = inp.vocab_size
        # by id: transformers hands the vocabulary over in hash order, which changes from run to run
        for t, idx in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if idx < limit:
                plain.setdefault(t, None)
        for idx, info in sorted(tok.added_tokens_decoder.items(), key=lambda item: item[0]):
            if idx < limit:
                special.setdefault(info.content, info)
    out = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    added = []
    for t in plain:
        if t not in special and t not in base_vocab:
            out.add_tokens(t)
            added.append(t)
    for t, info in special.items():
        if t not in base_vocab:
            added.append(t)
        out.add_tokens(info)
    return out, added


def describe_differences(inputs: Sequence[VocabInput], *, trust_remote_code: bool = False) -> list[str]:
    """How each input's vocabulary differs from the first's (empty when they agree): tokens it adds, tokens it
    lacks, tokens at other ids. Tokenizers whose files are identical are not loaded."""
    first = inputs[0]
    if first.tokenizer_path is None:
        return []
    digests = {i: tokenizer_digest(inp.tokenizer_path) for i, inp in enumerate(inputs)
               if inp.tokenizer_path is not None}
    if len(set(digests.values())) <= 1 and all(inp.rows == first.rows for inp in inputs):
        return []
    ref = _vocab_of(load_tokenizer(first.tokenizer_path, trust_remote_code=trust_remote_code), first.vocab_size)
    lines = []
    for i, inp in enumerate(inputs[1:], 1):
        if inp.tokenizer_path is None or digests.get(i) == digests.get(0):
            if inp.rows != first.rows:
                lines.append(f"{inp.role} ({inp.reference}): {inp.rows} rows, the {first.role} has {first.rows}")
            continue
        v = _vocab_of(load_tokenizer(inp.tokenizer_path, trust_remote_code=trust_remote_code), inp.vocab_size)
        adds = sorted((t for t in v if t not in ref), key=v.__getitem__)
        lacks = sorted((t for t in ref if t not in v), key=ref.__getitem__)
        moved = sum(1 for t in v if t in ref and v[t] != ref[t])
        parts = [f"{inp.rows} rows ({first.role}: {first.rows})"]
        if adds:
            parts.append(f"adds {len(adds)} token(s): {_show(adds)}")
        if lacks:
            parts.append(f"lacks {len(lacks)} of the {first.role}'s: {_show(lacks)}")
        if moved:
            parts.append(f"{moved} shared token(s) at other ids")
        if len(parts) > 1 or inp.rows != first.rows:
            lines.append(f"{inp.role} ({inp.reference}): " + "; ".join(parts))
    return lines


def read_vocab_size(folder: Path, rows: int) -> int:
    """The vocab_size a checkpoint's config declares, bounded by its embedding rows (rows when it declares none)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return rows
    size = config.get("vocab_size")
    if not isinstance(size, int):
        size = (config.get("text_config") or {}).get("vocab_size") if isinstance(config.get("text_config"), dict) \
            else None
    return min(size, rows) if isinstance(size, int) and size > 0 else rows
