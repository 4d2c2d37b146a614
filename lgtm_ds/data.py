"""Datasets, tokenizer and loaders for LGTM-DS.

Three sources (``DataConfig.source``):

* ``"synthetic"``: the embedded default experiment, a generated 3-class review-sentiment task
  (see :func:`make_synthetic_corpus`). Train = ``cfg.synthetic_examples`` examples with
  ``cfg.synthetic_label_noise`` of the labels flipped; validation = ``max(200, 20%)`` examples from
  a different seed and **without label noise**, so its accuracy reads directly as "how much of the
  rule the model learnt" (its ceiling is 100%).
* ``"glue"``: ``datasets.load_dataset("nyu-mll/glue", task)`` for cola, sst2, mrpc, qqp, stsb,
  mnli, qnli, rte (eval split: ``validation``, ``validation_matched`` for mnli).
* ``"files"``: csv / json / jsonl / parquet ``train_file`` (+ ``validation_file``). Without a
  ``validation_file`` a seeded 10% of the training file is carved off as the eval split; its row
  indices are recorded in ``TaskData.eval_indices``.

The quiz split (the held-out batches LGTM's teacher update is scored on) is carved from the
training data with a seeded permutation (``quiz_source="train"``, indices recorded in
``TaskData.quiz_indices``, relative to the rows of the original training set/file), or is the
validation split (``quiz_source="validation"``).

Tokenization truncates to ``max_length`` without padding; :func:`make_loader` pads per batch.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lgtm_ds.config import DataConfig
from lgtm_ds.errors import DataError

# ------------------------------------------------------------------------------------------------
# Synthetic task
# ------------------------------------------------------------------------------------------------

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


def _synthetic_sizes(cfg: DataConfig) -> tuple[int, int]:
    n_train = int(cfg.synthetic_examples)
    return n_train, max(200, int(round(0.2 * n_train)))


_SYNTHETIC_VALIDATION_SEED_OFFSET = 1_000_003


def synthetic_corpus_texts(cfg: DataConfig, seed: int) -> list[str]:
    """The synthetic training texts ``load_task`` will use (build the embedded tokenizer on
    them)."""
    n_train, _ = _synthetic_sizes(cfg)
    return make_synthetic_corpus(n_train, seed, 0.0)["text"]


def _synthetic_lexicon_text() -> str:
    words = set(_SENTIMENT) | set(_INTENSIFIERS) | set(_NEGATIONS) | set(_VERBS)
    words |= set(_CONNECTIVES) | {"the", "of"}
    for d in _DOMAINS.values():
        for k in ("subjects", "aspects", "fillers"):
            for phrase in d[k]:
                words |= set(phrase.split())
    for phrase in _OPENERS + _CLOSERS:
        words |= set(phrase.split())
    return " ".join(sorted(words)) + " , . ;"


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

EMBEDDED_VOCAB_SIZE = 1500
EMBEDDED_MODEL_MAX_LENGTH = 512
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _build_embedded_tokenizer(corpus_texts: list[str] | None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if corpus_texts is None:
        corpus_texts = synthetic_corpus_texts(DataConfig(), 42)
    tok = Tokenizer(
        models.WordPiece(
            {t: i for i, t in enumerate(_SPECIAL_TOKENS)},
            unk_token="[UNK]",
            max_input_chars_per_word=100,
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + punctuation split
    tok.decoder = decoders.WordPiece(prefix="##")
    vocab = _train_wordpiece_vocab(
        tok, [_synthetic_lexicon_text(), *corpus_texts], EMBEDDED_VOCAB_SIZE
    )
    tok.model = models.WordPiece(
        vocab, unk_token="[UNK]", max_input_chars_per_word=100, continuing_subword_prefix="##"
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=EMBEDDED_MODEL_MAX_LENGTH,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _train_wordpiece_vocab(tok, texts: list[str], vocab_size: int) -> dict[str, int]:
    """Deterministic frequency-based WordPiece vocabulary (the ``tokenizers`` WordPieceTrainer
    breaks count ties by hash-map order, so its vocabulary differs between runs).

    Ids: the 5 specials (fixed ids 0-4), every character seen plus ASCII letters / digits /
    punctuation, each also as a ``##`` continuation; then whole words by (-count, word); then, up
    to ``vocab_size``, word-initial prefixes and ``##`` suffixes (2-6 characters) by
    (-count, piece), so unseen words split into frequent pieces instead of single characters.
    """
    import string
    from collections import Counter

    words: Counter[str] = Counter()
    for text in texts:
        norm = tok.normalizer.normalize_str(text)
        for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
            words[w] += 1
    chars = set(string.ascii_lowercase + string.digits + string.punctuation)
    for w in words:
        chars.update(w)
    chars = sorted(chars)
    ordered: list[str] = list(_SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    ordered += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces: Counter[str] = Counter()
    for w, n in words.items():
        for k in range(2, min(len(w), 7)):
            pieces[w[:k]] += n
            pieces["##" + w[-k:]] += n
    seen = set(ordered)
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(ordered) >= vocab_size:
            break
        if piece not in seen:
            ordered.append(piece)
            seen.add(piece)
    return {t: i for i, t in enumerate(ordered)}


def build_tokenizer(name: str | None, corpus_texts: list[str] | None = None):
    """``"embedded"``: an offline BERT-style WordPiece tokenizer trained on ``corpus_texts`` (the
    synthetic corpus when None); any other name/path: ``AutoTokenizer.from_pretrained(name)``."""
    if name is None:
        raise DataError("model.tokenizer is None: pass the teacher's name/path or 'embedded'")
    if name == "embedded":
        return _build_embedded_tokenizer(corpus_texts)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure is reported as a DataError
        raise DataError(
            f"could not load tokenizer {name!r} (not a local tokenizer folder, or the Hugging "
            f"Face Hub is unreachable): {type(e).__name__}: {e}"
        ) from e


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------

GLUE_DATASET_ID = "nyu-mll/glue"
# task -> (text columns, validation split, num_labels, metric names)
GLUE_TASKS: dict[str, tuple[list[str], str, int, list[str]]] = {
    "cola": (["sentence"], "validation", 2, ["matthews"]),
    "sst2": (["sentence"], "validation", 2, ["accuracy"]),
    "mrpc": (["sentence1", "sentence2"], "validation", 2, ["f1", "accuracy"]),
    "qqp": (["question1", "question2"], "validation", 2, ["f1", "accuracy"]),
    "stsb": (["sentence1", "sentence2"], "validation", 1, ["pearson", "spearman"]),
    "mnli": (["premise", "hypothesis"], "validation_matched", 3, ["accuracy"]),
    "qnli": (["question", "sentence"], "validation", 2, ["accuracy"]),
    "rte": (["sentence1", "sentence2"], "validation", 2, ["accuracy"]),
}
VALID_SOURCES = ("synthetic", "glue", "files")
VALID_QUIZ_SOURCES = ("train", "validation")
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FILES_EVAL_FRACTION = 0.1
_ORIG = "__orig_idx__"

# Module-level hook so tests can feed fake datasets; load_task(_load_dataset=...) overrides it.
LOAD_DATASET: Callable[..., Any] = datasets.load_dataset


@dataclass
class TaskData:
    name: str  # "synthetic", GLUE task name, or the train file stem
    train: datasets.Dataset  # tokenized: input_ids, attention_mask, (token_type_ids), labels
    quiz: datasets.Dataset  # same columns (held-out split the student never trains on)
    eval: datasets.Dataset  # same columns
    num_labels: int  # 1 for regression (stsb)
    is_regression: bool
    metric_names: list[str]
    label_names: list[str] | None
    quiz_indices: list[int]  # rows of the original training set; [] for quiz_source "validation"
    quiz_source: str
    # Rows of the training file carved off as the eval split (files source without a
    # validation_file); [] otherwise.
    eval_indices: list[int] = field(default_factory=list)


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.source not in VALID_SOURCES:
        raise DataError(
            f"data.source={cfg.source!r} is not valid; choose one of {', '.join(VALID_SOURCES)}"
        )
    if cfg.quiz_source not in VALID_QUIZ_SOURCES:
        raise DataError(
            f"data.quiz_source={cfg.quiz_source!r} is not valid; choose one of "
            f"{', '.join(VALID_QUIZ_SOURCES)}"
        )
    if cfg.quiz_source == "train" and not (0.0 < float(cfg.quiz_fraction) <= 0.5):
        raise DataError(f"data.quiz_fraction={cfg.quiz_fraction} must be in (0, 0.5]")
    if not cfg.text_columns or len(cfg.text_columns) > 2:
        raise DataError(
            f"data.text_columns={cfg.text_columns!r} must name one column or two (pairs)"
        )
    if cfg.max_length < 8:
        raise DataError(f"data.max_length={cfg.max_length} is too small (need >= 8)")


def _with_orig_index(ds: datasets.Dataset) -> datasets.Dataset:
    return ds.add_column(_ORIG, list(range(len(ds))))


def _check_nonempty(ds: datasets.Dataset, what: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{what} is empty (0 rows)")


def _check_columns(ds: datasets.Dataset, columns: list[str], where: str) -> None:
    for col in columns:
        if col not in ds.column_names:
            raise DataError(
                f"column {col!r} not found in {where}; its columns are {ds.column_names}"
            )


def _load_synthetic(cfg: DataConfig, seed: int):
    n_train, n_val = _synthetic_sizes(cfg)
    train = make_synthetic_corpus(n_train, seed, float(cfg.synthetic_label_noise))
    val = make_synthetic_corpus(n_val, seed + _SYNTHETIC_VALIDATION_SEED_OFFSET, 0.0)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    return (
        datasets.Dataset.from_dict(train, features=features),
        datasets.Dataset.from_dict(val, features=features),
        ["text"],
        3,
        False,
        ["accuracy"],
        list(SYNTHETIC_LABEL_NAMES),
    )


def _load_glue(cfg: DataConfig, load_fn):
    task = (cfg.task or "").lower()
    if task not in GLUE_TASKS:
        raise DataError(
            f"data.task={cfg.task!r} is not a supported GLUE task; valid: {', '.join(GLUE_TASKS)}"
        )
    cols, val_split, num_labels, metrics = GLUE_TASKS[task]
    try:
        dsd = load_fn(GLUE_DATASET_ID, task)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"could not load GLUE task {task!r} ({GLUE_DATASET_ID}) from the Hugging Face Hub "
            f"(hub unreachable or dataset unavailable): {type(e).__name__}: {e}"
        ) from e
    for split in ("train", val_split):
        if split not in dsd:
            raise DataError(f"GLUE task {task!r}: split {split!r} missing; got {list(dsd.keys())}")
        _check_columns(dsd[split], cols + ["label"], f"GLUE task {task!r} split {split!r}")
    train, val = dsd["train"], dsd[val_split]
    label_names = None
    feat = train.features.get("label")
    if num_labels > 1 and isinstance(feat, datasets.ClassLabel):
        label_names = list(feat.names)
    return train, val, cols, num_labels, num_labels == 1, metrics, label_names


def _load_file(path: str, load_fn, role: str) -> datasets.Dataset:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(
            f"data.{role}={path!r}: unsupported extension {ext!r}; use one of "
            f"{', '.join(_FILE_BUILDERS)}"
        )
    if not os.path.isfile(path):
        raise DataError(f"data.{role}: file not found: {path}")
    if os.path.getsize(path) == 0:
        split = "training" if role == "train_file" else "validation"
        raise DataError(f"{split} split ({path}) is empty (0 bytes, 0 rows)")
    with tempfile.TemporaryDirectory(prefix="lgtm_ds_cache_") as cache_dir:
        try:
            ds = load_fn(
                _FILE_BUILDERS[ext],
                data_files={"train": os.path.abspath(path)},
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
            )
        except Exception as e:  # noqa: BLE001
            if "corresponds to no data" in str(e):  # datasets' error for a 0-row file
                split = "training" if role == "train_file" else "validation"
                raise DataError(f"{split} split ({path}) is empty (0 rows)") from e
            raise DataError(
                f"data.{role}: could not read {path} as {_FILE_BUILDERS[ext]}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not ds.cache_files:
            return ds
        # Not in memory after all (e.g. a custom loader): materialise before the dir goes away.
        return datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)


def _encode_file_labels(
    train: datasets.Dataset,
    val: datasets.Dataset | None,
    label_col: str,
    train_path: str,
    val_path: str | None,
):
    """Ints -> classification ids; strings/bools -> sorted ids; floats -> regression."""
    tr = train[label_col]
    va = val[label_col] if val is not None else []
    for values, path in ((tr, train_path), (va, val_path)):
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                raise DataError(f"column {label_col!r} of {path}: missing label in row {i}")
    kinds = {type(v) for v in list(tr) + list(va)}
    if kinds <= {float, int} and float in kinds:
        return [float(v) for v in tr], [float(v) for v in va], 1, True, None
    if kinds <= {int}:
        neg = [v for v in list(tr) + list(va) if v < 0]
        if neg:
            raise DataError(
                f"column {label_col!r}: integer labels must be >= 0 (class ids), got {neg[0]}"
            )
        num_labels = max(tr) + 1
        bad = [v for v in va if v >= num_labels]
        if bad:
            raise DataError(
                f"column {label_col!r} of {val_path}: label {bad[0]} does not occur in the "
                f"training file {train_path} (its labels are 0..{num_labels - 1})"
            )
        return list(tr), list(va), num_labels, False, None
    tr_s = [str(v) for v in tr]
    va_s = [str(v) for v in va]
    names = sorted(set(tr_s))
    mapping = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(va_s) - set(names))
    if unseen:
        raise DataError(
            f"column {label_col!r} of {val_path}: label(s) {unseen} do not occur in the training "
            f"file {train_path} (its labels are {names})"
        )
    return [mapping[v] for v in tr_s], [mapping[v] for v in va_s], len(names), False, names


def _load_files(cfg: DataConfig, load_fn, seed: int):
    if not cfg.train_file:
        raise DataError("data.source='files' needs data.train_file")
    cols = list(cfg.text_columns)
    train = _load_file(cfg.train_file, load_fn, "train_file")
    _check_columns(train, cols + [cfg.label_column], cfg.train_file)
    _check_nonempty(train, f"training split ({cfg.train_file})")
    val = None
    if cfg.validation_file:
        val = _load_file(cfg.validation_file, load_fn, "validation_file")
        _check_columns(val, cols + [cfg.label_column], cfg.validation_file)
        _check_nonempty(val, f"validation split ({cfg.validation_file})")
    for ds, path in ((train, cfg.train_file), (val, cfg.validation_file)):
        if ds is None:
            continue
        for col in cols:
            for i, v in enumerate(ds[col]):
                if v is None:
                    raise DataError(f"column {col!r} of {path}: missing text in row {i}")
    tr_l, va_l, num_labels, is_reg, names = _encode_file_labels(
        train, val, cfg.label_column, cfg.train_file, cfg.validation_file
    )
    label_feature = datasets.Value("float32" if is_reg else "int64")

    def relabel(ds, labels):
        ds = ds.select_columns(cols).map(
            lambda b: {c: [str(x) for x in b[c]] for c in cols}, batched=True, keep_in_memory=True
        )
        return ds.add_column("label", labels, feature=label_feature)

    train = relabel(train, tr_l)
    val = relabel(val, va_l) if val is not None else None
    metrics = ["pearson", "spearman"] if is_reg else ["accuracy"]
    return train, val, cols, num_labels, is_reg, metrics, names


def _tokenize(
    ds: datasets.Dataset, tokenizer, cols: list[str], max_length: int, is_regression: bool
) -> datasets.Dataset:
    def fn(batch):
        a = [str(x) for x in batch[cols[0]]]
        b = [str(x) for x in batch[cols[1]]] if len(cols) == 2 else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        out["labels"] = [float(x) if is_regression else int(x) for x in batch["label"]]
        return out

    return ds.map(
        fn,
        batched=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
    )


def load_task(
    cfg: DataConfig, tokenizer, seed: int, *, _load_dataset: Callable[..., Any] | None = None
) -> TaskData:
    """Load, split and tokenize the task ``cfg`` describes (see the module docstring)."""
    _check_cfg(cfg)
    load_fn = _load_dataset if _load_dataset is not None else LOAD_DATASET
    eval_indices: list[int] = []
    if cfg.source == "synthetic":
        name = "synthetic"
        train, val, cols, num_labels, is_reg, metrics, label_names = _load_synthetic(cfg, seed)
    elif cfg.source == "glue":
        train, val, cols, num_labels, is_reg, metrics, label_names = _load_glue(cfg, load_fn)
        name = (cfg.task or "").lower()
    else:
        train, val, cols, num_labels, is_reg, metrics, label_names = _load_files(cfg, load_fn, seed)
        name = os.path.splitext(os.path.basename(cfg.train_file))[0]

    train = _with_orig_index(train)
    _check_nonempty(train, f"training split of {name!r}")
    if val is None:
        # files without a validation_file: carve a seeded 10% of the training rows as eval.
        n = len(train)
        n_eval = max(1, int(round(FILES_EVAL_FRACTION * n)))
        if n_eval >= n:
            raise DataError(
                f"training split of {name!r} has {n} row(s): too few to carve an eval split; "
                "set data.validation_file"
            )
        perm = np.random.default_rng([seed, 1]).permutation(n)
        eval_indices = sorted(int(i) for i in perm[:n_eval])
        keep = sorted(int(i) for i in perm[n_eval:])
        val = train.select(eval_indices).remove_columns(_ORIG)
        train = train.select(keep)

    if cfg.max_train_examples is not None:
        train = train.select(range(min(len(train), int(cfg.max_train_examples))))
    if cfg.max_eval_examples is not None:
        val = val.select(range(min(len(val), int(cfg.max_eval_examples))))
    _check_nonempty(train, f"training split of {name!r} (after data.max_train_examples)")
    _check_nonempty(val, f"validation split of {name!r} (after data.max_eval_examples)")

    if cfg.quiz_source == "train":
        n = len(train)
        n_quiz = max(1, int(round(float(cfg.quiz_fraction) * n)))
        if n_quiz >= n:
            raise DataError(
                f"training split of {name!r} has {n} row(s): too few to carve a quiz split of "
                f"data.quiz_fraction={cfg.quiz_fraction}"
            )
        perm = np.random.default_rng(seed).permutation(n)
        quiz_pos = sorted(int(i) for i in perm[:n_quiz])
        train_pos = sorted(int(i) for i in perm[n_quiz:])
        orig = train[_ORIG]
        quiz_indices = [int(orig[i]) for i in quiz_pos]
        quiz = train.select(quiz_pos)
        train = train.select(train_pos)
    else:
        quiz_indices = []
        quiz = val
    train = train.remove_columns(_ORIG)
    if _ORIG in quiz.column_names:
        quiz = quiz.remove_columns(_ORIG)

    tok = lambda ds: _tokenize(ds, tokenizer, cols, cfg.max_length, is_reg)  # noqa: E731
    eval_tok = tok(val)
    return TaskData(
        name=name,
        train=tok(train),
        quiz=eval_tok if cfg.quiz_source == "validation" else tok(quiz),
        eval=eval_tok,
        num_labels=num_labels,
        is_regression=is_reg,
        metric_names=list(metrics),
        label_names=label_names,
        quiz_indices=quiz_indices,
        quiz_source=cfg.quiz_source,
        eval_indices=eval_indices,
    )


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


class PadCollator:
    """Pads input_ids (pad_token_id), attention_mask and token_type_ids (0) to the longest row of
    the batch, optionally rounded up to a multiple of ``pad_to_multiple_of``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        if m:
            length = ((length + m - 1) // m) * m
        out: dict[str, torch.Tensor] = {}
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows[0]]
        for k in keys:
            pad = self.pad_token_id if k == "input_ids" else 0
            t = torch.full((len(rows), length), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                v = r[k]
                t[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
            out[k] = t
        labels = [r["labels"] for r in rows]
        is_float = isinstance(labels[0], float)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
        return out


def make_loader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool,
    pad_token_id: int,
    epoch: int = 0,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """A DataLoader of padded tensor dicts over this rank's shard of ``ds``.

    Sharding is ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle, seed,
    drop_last)`` (also for one rank); call ``loader.sampler.set_epoch(e)`` for a new order. Note
    that with ``drop_last=False`` and ``len(ds)`` not divisible by ``world_size`` the sampler
    repeats a few rows so that every rank gets the same number.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=PadCollator(pad_token_id, pad_to_multiple_of),
        num_workers=0,
    )


class InfiniteLoader:
    """Cycles a :func:`make_loader` loader forever; epoch ``e`` calls ``sampler.set_epoch(e)``, so
    the order of each pass is a deterministic function of (seed, e).

    ``state_dict()`` / ``load_state_dict()`` record (epoch, batches consumed in it) for resuming.
    """

    def __init__(self, loader: DataLoader, start_epoch: int = 0):
        if len(loader) == 0:
            raise DataError(
                "quiz/infinite loader has no batches (dataset smaller than one batch with "
                "drop_last=True?)"
            )
        self.loader = loader
        self.epoch = start_epoch
        self.position = 0
        self._it: Iterator | None = None

    def _start_epoch(self, skip: int = 0) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(skip):
            next(self._it)
        self.position = skip

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = len(self.loader)
        epoch, position = int(state["epoch"]), int(state["position"])
        self.epoch = epoch + position // n  # a finished pass resumes at the next epoch
        self._start_epoch(skip=position % n)
