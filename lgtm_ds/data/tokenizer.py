"""Tokenizers: a Hugging Face tokenizer by name or path, or the embedded one.

``"embedded"`` is a BERT-style WordPiece tokenizer built offline, deterministically, from the
synthetic corpus (no download): the tokenizer of the embedded default experiment.
"""

from __future__ import annotations

from ..errors import DataError
from .synthetic import lexicon_text, synthetic_corpus_texts

EMBEDDED_VOCAB_SIZE = 1500
EMBEDDED_MODEL_MAX_LENGTH = 512
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# (examples, seed) of the synthetic corpus the embedded tokenizer learns its pieces from when the
# run's own data is not the synthetic task (e.g. "embedded" with local files)
_FALLBACK_CORPUS = (3000, 42)


def _build_embedded_tokenizer(corpus_texts: list[str] | None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if corpus_texts is None:
        corpus_texts = synthetic_corpus_texts(*_FALLBACK_CORPUS)
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
    vocab = _train_wordpiece_vocab(tok, [lexicon_text(), *corpus_texts], EMBEDDED_VOCAB_SIZE)
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
