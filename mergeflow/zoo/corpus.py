"""The pre-training mixture: "generic web text" that carries the tasks' skills latently, plus unanswered prompts.

Generic documents cover the whole vocabulary and state the world knowledge the tasks ask about (place -> activity
facts, reviews with a verdict, topic-coherent sentences, paraphrase pairs, clock arithmetic), always in surface forms
that never use a task's template or answer words. Prompt documents are task contexts without their answers. With
no labelled examples the base knows the lexicons and the facts but is at chance on every task (ZOO.md §1, §5).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import torch

from mergeflow.zoo.tasks import (
    AREAS,
    ARITH_OPS,
    COMPARATIVES,
    NAMES,
    NEGATION_RATE,
    OBJECTS,
    PLACES,
    TASKS,
    area_sentence,
    paraphrase_pair,
    review_text,
    topic_article,
)

# Relative weights of the generic document kinds.
GENERIC_KINDS = {"area": 0.2, "facts": 0.25, "clock": 0.1, "review": 0.2, "paraphrase": 0.15, "transfer": 0.1}


def _area_doc(rng: random.Random) -> str:
    area = rng.choice(tuple(AREAS))
    return " ".join(area_sentence(rng, area) for _ in range(rng.randint(1, 3)))


def _facts_doc(rng: random.Random) -> str:
    # Three surface forms of one fact; the two-sentence one lets a cheap base link a place to a later activity.
    sentences = []
    for _ in range(rng.randint(1, 3)):
        place = rng.choice(tuple(PLACES))
        name, activity = rng.choice(NAMES), rng.choice(PLACES[place])
        form = rng.randrange(3)
        if form == 0:
            sentences.append(f"in the {place} {name} {activity} .")
        elif form == 1:
            sentences.append(f"{name} {activity} in the {place} .")
        else:
            sentences.append(f"{name} was in the {place} . {name} {activity} .")
    return " ".join(sentences)


def _clock_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            sentences.append(f"{a} plus {b} makes {(a + b) % 10} .")
        else:
            sentences.append(f"{a} minus {b} makes {(a - b) % 10} .")
    return " ".join(sentences)


def _review_doc(rng: random.Random) -> str:
    # The only place where good/bad act as a verdict: the OOD `opinion` task leans on it.
    text, polarity = review_text(rng)
    return f"{text} . so it was {'good' if polarity > 0 else 'bad'} ."


def _paraphrase_doc(rng: random.Random) -> str:
    area = rng.choice(tuple(AREAS))
    s1 = area_sentence(rng, area)
    return f"{s1} in other words {area_sentence(rng, area, avoid=s1.split())}"


def _transfer_doc(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(OBJECTS)
    match rng.randrange(3):
        case 0:
            return f"{a} gave the {thing} to {b} ."
        case 1:
            return f"{b} received the {thing} from {a} ."
        case _:
            x, y = rng.sample(OBJECTS, 2)
            return f"the {x} is {rng.choice(COMPARATIVES)} than the {y} ."


_GENERIC = {
    "area": _area_doc,
    "facts": _facts_doc,
    "clock": _clock_doc,
    "review": _review_doc,
    "paraphrase": _paraphrase_doc,
    "transfer": _transfer_doc,
}


def generic_document(rng: random.Random) -> str:
    kind = rng.choices(tuple(GENERIC_KINDS), weights=tuple(GENERIC_KINDS.values()))[0]
    return _GENERIC[kind](rng)


def prompt_document(rng: random.Random, tasks: Sequence[str]) -> str:
    return TASKS[rng.choice(tasks)].generate(rng)["context"]


# ----------------------------------------------------------------------------------------------- latent skills
# The SFT regime's base learns the in-domain tasks' skills from text that states them in surface forms of their own:
# never a task's template, and answered with other words than the task's verbalizer (good/bad for positive/negative,
# a topic's canonical noun for its name, "the same"/"not the same" for yes/no, the place of an activity for nli's
# yes/maybe/no, "a plus b makes c" for "compute : a plus b mod 10 equals c", the activity that follows a place for
# complete's story). An expert then only has to tie its template to a skill the base already has, which takes a
# small task vector. complete's form is the task's own skill with the story left out (the activity of the place just
# named), so the base does much of the task from it: the SFT zoo states it less often than the others.

# A topic is named by one of its nouns in latent text, so that the base knows topics without the task's answer words.
TOPIC_CANON = {"sports": "league", "politics": "parliament", "science": "laboratory", "business": "economy"}
SAME = ("the same", "not the same")


def _latent_sentiment(rng: random.Random, negation: float = NEGATION_RATE) -> tuple[str, str]:
    text, polarity = review_text(rng, negation)
    return f"{text} . so it was", "good" if polarity > 0 else "bad"


def _latent_topic(rng: random.Random) -> tuple[str, str]:
    topic, text = topic_article(rng)
    return f"{text} so it was on the", TOPIC_CANON[topic]


def _latent_paraphrase(rng: random.Random) -> tuple[str, str]:
    s1, s2, same = paraphrase_pair(rng)
    return f"{s1} {s2} so it was", SAME[0] if same else SAME[1]


def _latent_nli(rng: random.Random) -> tuple[str, str]:
    # the activity first, then where it happens: the reverse of the task's premise -> hypothesis direction, and of
    # `complete`'s place -> activity, which the base then knows only from generic text
    place = rng.choice(tuple(PLACES))
    return f"{rng.choice(NAMES)} {rng.choice(PLACES[place])} in the", place


def _latent_complete(rng: random.Random) -> tuple[str, str]:
    place, name = rng.choice(tuple(PLACES)), rng.choice(NAMES)
    return f"{name} was in the {place} . {name}", rng.choice(PLACES[place])


def _latent_arith(rng: random.Random) -> tuple[str, str]:
    # the task's operands (b <= 4) in the clock form of generic text
    a, b = rng.randrange(10), rng.randint(1, 4)
    op = rng.choice(tuple(ARITH_OPS))
    return f"{a} {op} {b} makes", str((a + ARITH_OPS[op] * b) % 10)


LATENT = {
    "sentiment": _latent_sentiment,
    "topic": _latent_topic,
    "paraphrase": _latent_paraphrase,
    "nli": _latent_nli,
    "arith": _latent_arith,
    "complete": _latent_complete,
}


def latent_example(rng: random.Random, tasks: Sequence[str], weights: Sequence[float]) -> tuple[str, str]:
    """(context, answer) of one task's skill in its latent form, the task drawn by ``weights``."""
    return LATENT[rng.choices(tasks, weights=weights)[0]](rng)


def latent_document(rng: random.Random, tasks: Sequence[str], weights: Sequence[float]) -> str:
    context, answer = latent_example(rng, tasks, weights)
    return f"{context} {answer} ."


# Negation in the tuning's reviews, against the task's 0.4: a review's verdict is then mostly its adjectives' polarity,
# a first-order signal the base learns at once, and negation is learned on top. With the task's rate the verdict is
# an XOR of polarity and negation that gradient descent finds only after a plateau whose length varies by seed
# (measured: the base's latent sentiment at 48 % on seed 0 and 95 % on seed 1 after the same 1500 steps).
TUNING_NEGATION_RATE = 0.15


def latent_tuning_examples(n: int, weights: dict[str, float], seed: int) -> list[tuple[str, str]]:
    """``n`` (context, answer) pairs for the SFT-regime base's answer-only tuning (like a chat model's instruction
    tuning, on the latent forms only: no task template is ever seen by the base)."""
    rng = random.Random(f"mergeflow-zoo/{seed}/latent-tuning")
    forms = {**LATENT, "sentiment": functools.partial(_latent_sentiment, negation=TUNING_NEGATION_RATE)}
    tasks = tuple(t for t in LATENT if weights.get(t, 0.0) > 0)
    w = tuple(weights[t] for t in tasks)
    return [forms[rng.choices(tasks, weights=w)[0]](rng) for _ in range(n)]


def labelled_document(rng: random.Random, tasks: Sequence[str], noise: float) -> str:
    """A task example whose answer is replaced by a random choice with probability ``noise``."""
    row = TASKS[rng.choice(tasks)].generate(rng)
    answer = rng.choice(row["choices"]) if rng.random() < noise else row["choices"][row["gold"]]
    return f"{row['context']} {answer}"


def pretraining_blocks(
    vocab: dict[str, int],
    *,
    n_blocks: int,
    block_len: int,
    mix: dict[str, float],
    prompt_tasks: Sequence[str],
    labelled_tasks: Sequence[str],
    label_noise: float,
    seed: int,
    bos_id: int,
    eos_id: int,
    latent_weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """``[n_blocks, block_len]`` token ids: documents ``<s> … </s>`` packed back to back and cut into blocks.

    ``mix`` gives the probability of each document kind: ``generic``, ``prompt``, ``labelled`` and ``latent`` (the
    skills of ``labelled_tasks`` in their own surface forms, ``LATENT``, drawn by ``latent_weights``, equal
    without them).
    """
    rng = random.Random(f"mergeflow-zoo/{seed}/pretraining")
    kinds = tuple(k for k in ("generic", "prompt", "labelled", "latent") if mix.get(k, 0.0) > 0)
    def weight(task: str) -> float:  # equal shares without weights; with weights, a task not named has none
        return 1.0 if latent_weights is None else latent_weights.get(task, 0.0)

    latent_tasks = tuple(t for t in labelled_tasks if t in LATENT and weight(t) > 0)
    latent_w = tuple(weight(t) for t in latent_tasks)
    weights = tuple(mix[k] for k in kinds)
    need = n_blocks * block_len
    stream: list[int] = []
    while len(stream) < need:
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "generic":
            text = generic_document(rng)
        elif kind == "prompt":
            text = prompt_document(rng, prompt_tasks)
        elif kind == "latent":
            text = latent_document(rng, latent_tasks, latent_w)
        else:
            text = labelled_document(rng, labelled_tasks, label_noise)
        stream.append(bos_id)
        stream.extend(vocab[w] for w in text.split())  # word-level: identical to the tokenizer, much faster
        stream.append(eos_id)
    return torch.tensor(stream[:need], dtype=torch.long).view(n_blocks, block_len)
