"""Seeded generators of the zoo's tasks: one prompt, a few short answers, one gold index.

Six in-domain tasks (FLAN-like: sentiment, topic, paraphrase, nli, arith, complete) and three out-of-domain tasks that
reuse an in-domain skill under another verbalizer (opinion), another role order (reverse_nli) or another text domain
(review_topic). The vocabularies overlap on purpose so that experts interfere when merged: topic nouns are the
subjects of reviews and paraphrase sentences, sentiment adjectives are noise in topic articles, places and activities
are shared by nli and complete, and yes/no answer both paraphrase and nli.

Everything here is pure: a generator takes a ``random.Random`` and returns one row ``{"context", "choices", "gold"}``.
A split draws from its own RNG seeded by (zoo seed, task, split), so adding a split or resizing another one never
changes a split's content. The lm-eval scoring joins context and answer with one space.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Row = dict  # {"context": str, "choices": list[str], "gold": int}

# ----------------------------------------------------------------------------------------------- lexicons

NAMES = (
    "alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy",
    "peggy", "oscar", "trent", "victor", "walter", "wendy", "mallory", "nina", "oliver", "sam",
)  # fmt: skip

TOPICS = ("sports", "politics", "science", "business")
TOPIC_NOUNS: dict[str, tuple[str, ...]] = {
    "sports": ("striker", "goalkeeper", "coach", "stadium", "match", "trophy", "ball", "league", "referee",
               "tournament", "athlete", "racket", "medal", "team"),
    "politics": ("president", "election", "senator", "parliament", "minister", "vote", "campaign", "law",
                 "governor", "treaty", "mayor", "congress", "policy", "ballot"),
    "science": ("biology", "data", "laboratory", "experiment", "theory", "telescope", "molecule", "physics",
                "scientist", "microscope", "chemistry", "galaxy", "atom", "vaccine"),
    "business": ("stock", "company", "investor", "profit", "revenue", "merger", "startup", "shareholder",
                 "budget", "contract", "salary", "economy", "factory", "manager"),
}  # fmt: skip
# Everyday objects: the fifth subject area of paraphrase and the objects of generic activities. `ball` is also a
# sports noun, which makes a little label noise in paraphrase (as in real data).
OBJECTS = ("letter", "bag", "shirt", "box", "key", "cup", "hat", "lamp", "chair", "cabinet", "spoon", "pillow",
           "blanket", "clock", "ball")  # fmt: skip
AREAS: dict[str, tuple[str, ...]] = {**TOPIC_NOUNS, "objects": OBJECTS}

POSITIVE = ("good", "great", "superb", "happy", "pleasant", "wonderful", "excellent", "impressive", "remarkable",
            "brilliant", "lovely", "delightful", "amazing", "fantastic", "charming", "nice", "perfect", "enjoyable",
            "splendid", "beautiful", "elegant", "fabulous", "terrific")  # fmt: skip
NEGATIVE = ("bad", "awful", "terrible", "horrible", "dull", "boring", "useless", "poor", "ugly", "sad", "nasty",
            "dreadful", "disappointing", "annoying", "mediocre", "weak", "miserable", "unpleasant", "lousy", "gloomy",
            "tedious", "clumsy", "pathetic")  # fmt: skip
NEUTRAL = ("quiet", "fine", "long", "round", "wooden", "small", "large", "red", "blue", "green", "old", "new",
           "heavy", "square", "plastic", "metal")  # fmt: skip
INTENSIFIERS = ("really", "quite", "extremely", "very", "truly", "rather")
NEGATIONS = ("not", "never")

TOPIC_VERBS = ("met", "praised", "visited", "joined", "followed", "supported", "criticized", "described", "ignored",
               "called", "trusted", "questioned", "thanked", "mentioned")  # fmt: skip
GENERIC_VERBS = ("opened", "wanted", "needed", "held", "found", "lost", "carried", "dropped", "cleaned", "moved",
                 "liked", "kept")  # fmt: skip

# Place -> its three typical activities: the world knowledge behind nli, reverse_nli and complete. Pre-training
# states these facts; the tasks only ask about them.
PLACES: dict[str, tuple[str, ...]] = {
    "kitchen": ("cooked the soup", "washed the dishes", "baked the bread"),
    "garden": ("planted the roses", "watered the plants", "picked the apples"),
    "gym": ("lifted the weights", "ran on the treadmill", "did the pushups"),
    "library": ("read the novel", "borrowed the book", "studied the atlas"),
    "bank": ("deposited the cash", "counted the coins", "signed the loan"),
    "office": ("typed the report", "answered the phone", "printed the memo"),
    "beach": ("swam in the sea", "built the sandcastle", "surfed the waves"),
    "school": ("taught the class", "graded the exams", "wrote on the board"),
    "hospital": ("treated the patient", "checked the pulse", "bandaged the wound"),
    "garage": ("fixed the car", "changed the tire", "repaired the engine"),
    "market": ("bought the fruit", "sold the fish", "weighed the cheese"),
    "theater": ("watched the play", "sang the song", "rehearsed the lines"),
}
MOTION_VERBS = ("walked", "drove", "went", "cycled")
DIGITS = tuple(str(d) for d in range(10))
COMPARATIVES = ("bigger", "smaller", "heavier", "older", "longer", "softer")  # only in pre-training text
ARITH_OPS = {"plus": 1, "minus": -1}

SENTIMENT_LABELS = ("positive", "negative")
OPINION_LABELS = ("good", "bad")
YES_NO = ("yes", "no")
NLI_LABELS = ("yes", "maybe", "no")

# ----------------------------------------------------------------------------------------------- text pieces


def _the(rng: random.Random, noun: str, adjectives: tuple[str, ...] = (), p_adj: float = 0.0) -> str:
    """``the [adj] noun``, with an adjective drawn with probability ``p_adj``."""
    if adjectives and rng.random() < p_adj:
        return f"the {rng.choice(adjectives)} {noun}"
    return f"the {noun}"


NEGATION_RATE = 0.4  # of a review's polar clauses


def polar_clause(rng: random.Random, noun: str, negation: float = NEGATION_RATE) -> tuple[str, int]:
    """``the noun was [not] [really] superb`` and its polarity (+1 / -1) after negation (with probability
    ``negation``; the same random draws whatever its value)."""
    polarity = rng.choice((1, -1))
    adjective = rng.choice(POSITIVE if polarity > 0 else NEGATIVE)
    words = ["the", noun, rng.choice(("is", "was"))]
    if rng.random() < negation:
        words.append(rng.choice(NEGATIONS))
        polarity = -polarity
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    words.append(adjective)
    return " ".join(words), polarity


def neutral_clause(rng: random.Random, noun: str) -> str:
    words = ["the", noun, rng.choice(("is", "was"))]
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(NEUTRAL))
    return " ".join(words)


def join_clauses(rng: random.Random, clauses: list[str]) -> str:
    text = clauses[0]
    for clause in clauses[1:]:
        text += f" {rng.choice(('and', 'but'))} {clause}"
    return text


def _all_topic_nouns() -> tuple[str, ...]:
    return tuple(n for nouns in TOPIC_NOUNS.values() for n in nouns)


def review_text(rng: random.Random, negation: float = NEGATION_RATE) -> tuple[str, int]:
    """Review clauses about topic nouns and their majority polarity (+1 / -1).

    One or three polar clauses decide (so there is always a strict majority); zero to two neutral clauses are noise.
    """
    nouns = _all_topic_nouns()
    polar = [polar_clause(rng, rng.choice(nouns), negation) for _ in range(rng.choice((1, 3)))]
    clauses = [text for text, _ in polar] + [neutral_clause(rng, rng.choice(nouns)) for _ in range(rng.randint(0, 2))]
    rng.shuffle(clauses)
    return join_clauses(rng, clauses), 1 if sum(p for _, p in polar) > 0 else -1


def majority_nouns(rng: random.Random, counts: tuple[tuple[int, int], ...]) -> tuple[str, list[str]]:
    """A topic and a shuffled list of its nouns (the strict majority) mixed with nouns of one other topic."""
    topic = rng.choice(TOPICS)
    other = rng.choice([t for t in TOPICS if t != topic])
    n_true, n_other = rng.choice(counts)
    nouns = rng.sample(TOPIC_NOUNS[topic], n_true) + rng.sample(TOPIC_NOUNS[other], n_other)
    rng.shuffle(nouns)
    return topic, nouns


def area_sentence(rng: random.Random, area: str, avoid: Iterable[str] = ()) -> str:
    """``the n1 verb the [adj] n2 .`` with both nouns from one subject area, avoiding given words."""
    pool = [n for n in AREAS[area] if n not in set(avoid)]
    n1, n2 = rng.sample(pool, 2)
    verb = rng.choice(GENERIC_VERBS + TOPIC_VERBS)
    return f"the {n1} {verb} {_the(rng, n2, POSITIVE + NEGATIVE + NEUTRAL, 0.5)} ."


def generic_activity(rng: random.Random) -> str:
    """An activity that no place implies: ``cleaned the wooden cup``."""
    return f"{rng.choice(GENERIC_VERBS)} {_the(rng, rng.choice(OBJECTS), NEUTRAL, 0.5)}"


def all_activities() -> list[tuple[str, str]]:
    return [(place, act) for place, acts in PLACES.items() for act in acts]


# ----------------------------------------------------------------------------------------------- generators


def gen_sentiment(rng: random.Random) -> Row:
    text, polarity = review_text(rng)
    return {"context": f"review : {text} . sentiment :", "choices": list(SENTIMENT_LABELS), "gold": int(polarity < 0)}


def gen_opinion(rng: random.Random) -> Row:
    # The sentiment prompt answered with another verbalizer; good/bad are verdicts only in pre-training text.
    text, polarity = review_text(rng)
    return {"context": f"review : {text} . sentiment :", "choices": list(OPINION_LABELS), "gold": int(polarity < 0)}


def gen_topic(rng: random.Random) -> Row:
    topic, text = topic_article(rng)
    return {"context": f"article : {text} topic :", "choices": list(TOPICS), "gold": TOPICS.index(topic)}


def topic_article(rng: random.Random) -> tuple[str, str]:
    """A news-like text whose majority of nouns is about one topic (sentiment adjectives as noise), and the topic."""
    topic, nouns = majority_nouns(rng, ((2, 1), (3, 1), (3, 2)))
    noise = POSITIVE + NEGATIVE

    def np_(noun: str) -> str:
        return _the(rng, noun, noise, 0.35)

    def verb() -> str:
        return rng.choice(TOPIC_VERBS)

    if len(nouns) == 3:
        text = f"{np_(nouns[0])} {verb()} {np_(nouns[1])} with {np_(nouns[2])} ."
    elif len(nouns) == 4:
        text = f"{np_(nouns[0])} {verb()} {np_(nouns[1])} . {np_(nouns[2])} {verb()} {np_(nouns[3])} ."
    else:
        text = (f"{np_(nouns[0])} {verb()} {np_(nouns[1])} with {np_(nouns[2])} . "
                f"{np_(nouns[3])} {verb()} {np_(nouns[4])} .")  # fmt: skip
    return topic, text


def gen_review_topic(rng: random.Random) -> Row:
    # The topic skill on review-style text: clauses of the sentiment task whose nouns carry the topic.
    topic, nouns = majority_nouns(rng, ((2, 1), (3, 1)))
    clauses = [polar_clause(rng, n)[0] if rng.random() < 0.7 else neutral_clause(rng, n) for n in nouns]
    text = join_clauses(rng, clauses)
    return {"context": f"article : {text} . topic :", "choices": list(TOPICS), "gold": TOPICS.index(topic)}


def gen_paraphrase(rng: random.Random) -> Row:
    s1, s2, same = paraphrase_pair(rng)
    context = f"sentence1 : {s1} sentence2 : {s2} same meaning ?"
    return {"context": context, "choices": list(YES_NO), "gold": 0 if same else 1}


def paraphrase_pair(rng: random.Random) -> tuple[str, str, bool]:
    """Two sentences and whether they "mean the same": the same subject area, in different words. Coarse-category
    equality is learnable at this scale, role swaps are not (see ZOO.md §5)."""
    area = rng.choice(tuple(AREAS))
    same = rng.random() < 0.5
    s1 = area_sentence(rng, area)
    area2 = area if same else rng.choice([a for a in AREAS if a != area])
    return s1, area_sentence(rng, area2, avoid=s1.split()), same


def _nli_pair(rng: random.Random) -> tuple[str, str, str, int]:
    """(name, place, activity, gold) with gold uniform over yes / maybe / no."""
    name = rng.choice(NAMES)
    place = rng.choice(tuple(PLACES))
    gold = rng.randrange(3)
    if gold == 0:
        activity = rng.choice(PLACES[place])
    elif gold == 1:
        activity = generic_activity(rng)
    else:
        activity = rng.choice([a for p, a in all_activities() if p != place])
    return name, place, activity, gold


def gen_nli(rng: random.Random) -> Row:
    name, place, activity, gold = _nli_pair(rng)
    context = f"premise : {name} was in the {place} . hypothesis : {name} {activity} . does it follow ?"
    return {"context": context, "choices": list(NLI_LABELS), "gold": gold}


def gen_reverse_nli(rng: random.Random) -> Row:
    name, place, activity, gold = _nli_pair(rng)
    context = f"premise : {name} {activity} . hypothesis : {name} was in the {place} . does it follow ?"
    return {"context": context, "choices": list(NLI_LABELS), "gold": gold}


def gen_arith(rng: random.Random) -> Row:
    # a ± b mod 10 with b <= 4: a small lookup is learnable in a few hundred steps, three operands are not.
    a, b = rng.randrange(10), rng.randint(1, 4)
    op = rng.choice(tuple(ARITH_OPS))
    answer = (a + ARITH_OPS[op] * b) % 10
    return {"context": f"compute : {a} {op} {b} mod 10 equals", "choices": list(DIGITS), "gold": answer}


def gen_complete(rng: random.Random) -> Row:
    name = rng.choice(NAMES)
    first, last = rng.sample(tuple(PLACES), 2)
    gold_text = rng.choice(PLACES[last])
    # Distractors: an activity of the first place (the trap) and two of other places.
    others = [a for p, a in all_activities() if p not in (first, last)]
    choices = [gold_text, rng.choice(PLACES[first]), *rng.sample(others, 2)]
    rng.shuffle(choices)
    context = f"story : {name} left the {first} and {rng.choice(MOTION_VERBS)} to the {last} . then {name}"
    return {"context": context, "choices": choices, "gold": choices.index(gold_text)}


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """One zoo task: its generator and how its splits relate."""

    name: str
    generate: Callable[[random.Random], Row]
    analogue: str  # the real benchmark it stands for
    chance: float  # accuracy of a uniform guess, in percent
    # Splits share no context when the prompt space is large; for small lookups (arith has 80 prompts, nli's
    # yes-prompts a few hundred) overlap is unavoidable and harmless: the label is a function of a fixed fact table.
    disjoint: bool
    skill_of: str | None = None  # for an OOD task: the in-domain task whose skill it reuses


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sentiment", gen_sentiment, "SST-2", 50.0, disjoint=True),
        TaskSpec("topic", gen_topic, "AG News", 25.0, disjoint=True),
        TaskSpec("paraphrase", gen_paraphrase, "MRPC", 50.0, disjoint=True),
        TaskSpec("nli", gen_nli, "MNLI", 100 / 3, disjoint=False),
        TaskSpec("arith", gen_arith, "modular arithmetic", 10.0, disjoint=False),
        TaskSpec("complete", gen_complete, "HellaSwag", 25.0, disjoint=True),
        TaskSpec("opinion", gen_opinion, "SST-2, other verbalizer", 50.0, disjoint=True, skill_of="sentiment"),
        TaskSpec("reverse_nli", gen_reverse_nli, "MNLI, roles swapped", 100 / 3, disjoint=False, skill_of="nli"),
        TaskSpec("review_topic", gen_review_topic, "AG News on reviews", 25.0, disjoint=True, skill_of="topic"),
    )
}

# Evaluation and reserved splits are drawn first so the train split can avoid their contexts.
SPLITS = ("test", "validation", "calib", "fewshot", "train")


def split_rng(seed: int, task: str, split: str) -> random.Random:
    # A str seed is hashed with sha512 by `random`, so it is stable across processes and PYTHONHASHSEED.
    return random.Random(f"mergeflow-zoo/{seed}/{task}/{split}")


def generate_split(
    task: str, split: str, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[Row]:
    """``n`` rows of one split; contexts in ``exclude`` are redrawn (used for disjoint tasks)."""
    spec = TASKS[task]
    rng = split_rng(seed, task, split)
    rows: list[Row] = []
    attempts = 0
    while len(rows) < n:
        row = spec.generate(rng)
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"task {task!r}: cannot draw {n} {split} rows avoiding {len(exclude)} contexts")
        if row["context"] in exclude:
            continue
        rows.append(row)
    return rows


def generate_task(task: str, sizes: dict[str, int], seed: int) -> dict[str, list[Row]]:
    """All splits of one task, in ``SPLITS`` order; for disjoint tasks no context appears in two splits."""
    spec = TASKS[task]
    seen: set[str] = set()
    data: dict[str, list[Row]] = {}
    for split in SPLITS:
        rows = generate_split(task, split, sizes[split], seed, exclude=seen if spec.disjoint else frozenset())
        if spec.disjoint:
            seen.update(r["context"] for r in rows)
        data[split] = rows
    return data


def template_words() -> set[str]:
    """Every word a task or the pre-training text can produce (the tokenizer's vocabulary, minus specials)."""
    words: set[str] = set()
    fixed = (
        "review : . sentiment article topic sentence1 sentence2 same meaning ? premise hypothesis does it follow "
        "was in the story left and to then compute mod 10 equals is but with so makes other words gave received "
        "from than on"
    )
    words.update(fixed.split())
    for group in (NAMES, TOPICS, OBJECTS, POSITIVE, NEGATIVE, NEUTRAL, INTENSIFIERS, NEGATIONS, TOPIC_VERBS,
                  GENERIC_VERBS, MOTION_VERBS, DIGITS, tuple(ARITH_OPS), SENTIMENT_LABELS, OPINION_LABELS, NLI_LABELS,
                  tuple(PLACES)):  # fmt: skip
        words.update(group)
    for nouns in TOPIC_NOUNS.values():
        words.update(nouns)
    for acts in PLACES.values():
        for act in acts:
            words.update(act.split())
    words.update(COMPARATIVES)
    return words
