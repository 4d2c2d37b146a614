"""The embedded default task: a generated 3-class review-sentiment corpus (no download).

The label is a function of the text (negation scope, intensifiers, which clause of a contrast
wins), so the clean accuracy ceiling is 100% while a bag-of-words model stays far below it; see
:func:`make_synthetic_corpus` for the generative rule and :func:`synthetic_rule_label` for the
rule applied to a text.
"""

from __future__ import annotations

import random

from ..errors import DataError

SYNTHETIC_LABEL_NAMES = ["negative", "neutral", "positive"]

_DOMAINS = {
    "film": {
        "subjects": ["the film", "this movie", "the show", "this documentary", "the sequel"],
        "aspects": [
            "acting",
            "plot",
            "soundtrack",
            "ending",
            "dialogue",
            "pacing",
            "cast",
            "cinematography",
            "script",
            "humour",
        ],
        "fillers": [
            "i watched it last weekend",
            "we saw it on a rainy sunday",
            "my sister picked it for movie night",
            "i streamed it on my laptop",
            "it came out last spring",
            "a friend recommended it to me",
        ],
    },
    "product": {
        "subjects": [
            "this phone",
            "the laptop",
            "these headphones",
            "the blender",
            "this camera",
            "the kettle",
        ],
        "aspects": [
            "battery",
            "screen",
            "price",
            "design",
            "sound",
            "keyboard",
            "packaging",
            "delivery",
            "lens",
            "handle",
        ],
        "fillers": [
            "i bought it last month",
            "it arrived on tuesday",
            "i got it as a birthday present",
            "i have used it for two weeks",
            "i ordered it online",
            "my neighbour has the same model",
        ],
    },
}
# word -> signed base score (strength 1 or 2); neutral words score 0.
_POSITIVE = {
    "good": 1,
    "nice": 1,
    "decent": 1,
    "pleasant": 1,
    "solid": 1,
    "excellent": 2,
    "brilliant": 2,
    "superb": 2,
    "wonderful": 2,
    "fantastic": 2,
}
_NEGATIVE = {
    "bad": -1,
    "weak": -1,
    "dull": -1,
    "poor": -1,
    "mediocre": -1,
    "terrible": -2,
    "awful": -2,
    "horrible": -2,
    "dreadful": -2,
    "atrocious": -2,
}
_NEUTRAL = {"average": 0, "standard": 0, "ordinary": 0, "typical": 0, "normal": 0}
_SENTIMENT = {**_POSITIVE, **_NEGATIVE, **_NEUTRAL}
_INTENSIFIERS = ["very", "really", "extremely", "incredibly", "truly"]
_NEGATIONS = ["not", "never"]
_VERBS = ["was", "is", "felt", "seemed", "looked"]
_OPENERS = [
    "honestly",
    "to be fair",
    "in my opinion",
    "frankly",
    "for what it is worth",
    "all things considered",
    "if you ask me",
]
_CLOSERS = [
    "that is my take",
    "make of that what you will",
    "just my two cents",
    "i will leave it there",
    "thanks for reading",
]
# Connectives: "and" combines the clauses; "but" and "however" mean the second clause wins;
# "although X , Y" means the main clause Y wins.
_CONNECTIVES = ["and", "but", "however", "although"]


def _clause_score(neg: bool, intens: bool, word: str) -> int:
    base = _SENTIMENT[word]
    if base == 0:
        return 0
    mag = abs(base) + (1 if intens else 0)
    sign = 1 if base > 0 else -1
    if neg:  # "not terrible" is mildly positive, "not very good" mildly negative
        return -sign
    return sign * mag


def _polarity_to_label(score: int) -> int:
    return 0 if score < 0 else (2 if score > 0 else 1)


def synthetic_rule_label(text: str) -> int:
    """The noise-free label of a synthetic sentence, recovered from its text alone.

    It is the generative rule of :func:`make_synthetic_corpus` applied to the words, and shows the
    task's clean accuracy ceiling is 100% (the label is a function of the text).
    """
    words = text.replace(",", " , ").replace(".", " . ").split()
    clauses: list[list[str]] = [[]]
    mode = "single"
    for w in words:
        if w in ("and", "but", "however"):
            mode = w
            clauses.append([])
        elif w == "although":
            mode = "although"
        elif w == "," and mode == "although" and len(clauses) == 1:
            clauses.append([])
        else:
            clauses[-1].append(w)
    scores = []
    for c in clauses:
        sw = [w for w in c if w in _SENTIMENT]
        if len(sw) != 1:
            raise ValueError(f"not a synthetic sentence (clause {' '.join(c)!r}): {text!r}")
        scores.append(
            _clause_score(
                any(w in _NEGATIONS for w in c), any(w in _INTENSIFIERS for w in c), sw[0]
            )
        )
    if mode == "single":
        total = scores[0]
    elif mode == "and":
        total = scores[0] + scores[1]
    else:  # but / however / although: the second (main) clause wins
        total = scores[1]
    return _polarity_to_label(total)


def _sample_clause(rng: random.Random, aspect_phrase: str) -> tuple[list[str], int]:
    kind = rng.random()
    if kind < 0.2:
        word = rng.choice(sorted(_NEUTRAL))
        neg = intens = False
    else:
        word = rng.choice(sorted(_POSITIVE) if rng.random() < 0.5 else sorted(_NEGATIVE))
        neg = rng.random() < 0.3
        intens = rng.random() < 0.3
    words = aspect_phrase.split() + [rng.choice(_VERBS)]
    if neg:
        words.append(rng.choice(_NEGATIONS))
    if intens:
        words.append(rng.choice(_INTENSIFIERS))
    words.append(word)
    return words, _clause_score(neg, intens, word)


def _sample_sentence(rng: random.Random) -> tuple[str, int]:
    domain = _DOMAINS[rng.choice(sorted(_DOMAINS))]
    subject = rng.choice(domain["subjects"])
    a1, a2 = rng.sample(domain["aspects"], 2)
    c1, s1 = _sample_clause(rng, f"the {a1} of {subject}")
    r = rng.random()
    if r < 0.35:
        body, total = c1, s1
    else:
        c2, s2 = _sample_clause(rng, f"the {a2}")
        if r < 0.55:
            body, total = c1 + ["and"] + c2, s1 + s2
        elif r < 0.75:
            body, total = c1 + [",", "but"] + c2, s2
        elif r < 0.88:
            body, total = c1 + [";", "however", ","] + c2, s2
        else:
            body, total = ["although"] + c1 + [","] + c2, s2
    while True:
        pre: list[str] = []
        if rng.random() < 0.5:
            pre += rng.choice(_OPENERS).split() + [","]
        if rng.random() < 0.6:
            pre += rng.choice(domain["fillers"]).split() + [","]
        post: list[str] = []
        if rng.random() < 0.25:
            post = [".", *rng.choice(_CLOSERS).split()]
        words = pre + body + post + ["."]
        n_words = sum(1 for w in words if w not in {",", ".", ";"})
        if 8 <= n_words <= 30:
            return " ".join(words), _polarity_to_label(total)


def make_synthetic_corpus(n_examples: int, seed: int, label_noise: float) -> dict[str, list]:
    """A deterministic 3-class review-sentiment corpus: ``{"text": [...], "label": [...]}``.

    Generative rule (labels 0 = negative, 1 = neutral, 2 = positive):

    * A sentence is ``[opener ,] [neutral filler fact ,] BODY [. closer] .`` about a film or a
      product; openers, fillers and closers carry no sentiment. 8-30 words.
    * A clause is ``the <aspect> [of <subject>] <verb> [not|never] [intensifier] <word>``.
      Sentiment words have strength 1 (good, weak, ...) or 2 (excellent, awful, ...), or are
      neutral (average, typical, ...; score 0, never negated or intensified). Clause score =
      sign * strength, +1 magnitude with an intensifier ("very good" = +2, "very awful" = -3);
      negation flips the sign and reduces the magnitude to 1 ("not terrible" = +1,
      "not very good" = -1).
    * BODY is one clause (score = its score), ``c1 and c2`` (score = s1 + s2, so "good and bad" is
      neutral and "excellent and weak" positive), or a contrast where the second / main clause
      wins: ``c1 , but c2``, ``c1 ; however , c2``, ``although c1 , c2`` (score = s2).
    * label = negative / neutral / positive for score < 0 / = 0 / > 0. Each example first draws a
      target class uniformly and re-samples sentences until the rule gives it, so classes are
      balanced.
    * Label noise: exactly ``round(label_noise * n_examples)`` examples, chosen uniformly without
      replacement by a separate seeded RNG, get their label replaced by one of the two other
      classes uniformly. The texts do not depend on ``label_noise``.

    :func:`synthetic_rule_label` recovers the clean label from the text (ceiling 100%); a
    bag-of-words classifier cannot represent negation scope or which clause wins.
    """
    if n_examples <= 0:
        raise DataError(f"synthetic corpus: n_examples must be positive, got {n_examples}")
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"data.synthetic_label_noise must be in [0, 1), got {label_noise}")
    rng = random.Random(f"lgtm-synthetic-text-{seed}")
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(n_examples):
        target = rng.randrange(3)
        while True:
            text, label = _sample_sentence(rng)
            if label == target:
                break
        texts.append(text)
        labels.append(label)
    n_noisy = int(round(label_noise * n_examples))
    if n_noisy:
        noise_rng = random.Random(f"lgtm-synthetic-noise-{seed}")
        for i in noise_rng.sample(range(n_examples), n_noisy):
            labels[i] = (labels[i] + noise_rng.randrange(1, 3)) % 3
    return {"text": texts, "label": labels}


VALIDATION_SEED_OFFSET = 1_000_003


def synthetic_splits(n_train: int, seed: int, label_noise: float) -> tuple[dict, dict]:
    """(train, validation) corpora of the synthetic task: ``n_train`` examples with
    ``label_noise`` of the labels flipped, and ``max(200, 20%)`` noise-free validation examples
    from a different seed (their accuracy reads as "how much of the rule the model learnt")."""
    n_val = max(200, int(round(0.2 * n_train)))
    return (
        make_synthetic_corpus(n_train, seed, label_noise),
        make_synthetic_corpus(n_val, seed + VALIDATION_SEED_OFFSET, 0.0),
    )


def synthetic_corpus_texts(n_train: int, seed: int) -> list[str]:
    """The synthetic training texts the data source will use (the embedded tokenizer is built
    on them; the texts do not depend on the label noise)."""
    return make_synthetic_corpus(n_train, seed, 0.0)["text"]


def lexicon_text() -> str:
    words = set(_SENTIMENT) | set(_INTENSIFIERS) | set(_NEGATIONS) | set(_VERBS)
    words |= set(_CONNECTIVES) | {"the", "of"}
    for d in _DOMAINS.values():
        for k in ("subjects", "aspects", "fillers"):
            for phrase in d[k]:
                words |= set(phrase.split())
    for phrase in _OPENERS + _CLOSERS:
        words |= set(phrase.split())
    return " ".join(sorted(words)) + " , . ;"
