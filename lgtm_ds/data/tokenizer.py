"""Tokenizers: a Hugging Face tokenizer by name or path, or the embedded one.

``"embedded"`` is a BERT-style WordPiece tokenizer built offline, deterministically, from the
synthetic corpus (no download): the tokenizer of the embedded default experiment. With
``causal_lm=True`` it is a decoder tokenizer instead (:func:`_build_embedded_decoder_tokenizer`):
the same deterministic WordPiece vocabulary with ``<s>`` / ``</s>`` / ``<pad>`` and a chat
template, built from the synthetic instruction corpus by default.
"""

from __future__ import annotations

from ..errors import DataError
from .synthetic import lexicon_text, synthetic_corpus_texts
from .synthetic_lm import instruction_lexicon_text, synthetic_instruction_texts

EMBEDDED_VOCAB_SIZE = 1500
EMBEDDED_MODEL_MAX_LENGTH = 512
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# (examples, seed) of the synthetic corpus the embedded tokenizer learns its pieces from when the
# run's own data is not the synthetic task (e.g. "embedded" with local files)
_FALLBACK_CORPUS = (3000, 42)
# The decoder tokenizer: ids 0-3 are pad / unk / BOS / EOS, then the chat role markers.
_CHAT_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
_DECODER_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", *_CHAT_ROLE_TOKENS]
# Each turn is "<|role|> content </s>"; add_generation_prompt appends "<|assistant|>". Every
# render is a prefix of the render with more turns, which the messages format relies on to find
# the assistant turns (lgtm_ds.tasks.lm_data).
EMBEDDED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _build_embedded_tokenizer(corpus_texts: list[str] | None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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
    specials = {f"{t.strip('[]').lower()}_token": t for t in _SPECIAL_TOKENS}  # pad_token: [PAD]
    return _fast_tokenizer(tok, ["input_ids", "token_type_ids", "attention_mask"], **specials)


def _build_embedded_decoder_tokenizer(corpus_texts: list[str] | None):
    """The offline decoder tokenizer: lowercasing WordPiece with a deterministic vocabulary
    (:func:`_train_wordpiece_vocab`) from ``corpus_texts`` (the synthetic instruction corpus
    when None), ``<s>`` prepended by the post-processor, ``</s>`` as EOS, ``<pad>`` as pad (right
    padding), and :data:`EMBEDDED_CHAT_TEMPLATE`. No token type ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if corpus_texts is None:
        corpus_texts = synthetic_instruction_texts(*_FALLBACK_CORPUS)
    specials = _DECODER_SPECIAL_TOKENS
    tok = Tokenizer(
        models.WordPiece(
            {t: i for i, t in enumerate(specials)}, unk_token="<unk>", max_input_chars_per_word=100
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    texts = [instruction_lexicon_text(), *corpus_texts]
    vocab = _train_wordpiece_vocab(tok, texts, EMBEDDED_VOCAB_SIZE, specials=specials)
    tok.model = models.WordPiece(
        vocab, unk_token="<unk>", max_input_chars_per_word=100, continuing_subword_prefix="##"
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos)]
    )
    hf = _fast_tokenizer(
        tok,
        ["input_ids", "attention_mask"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=_CHAT_ROLE_TOKENS,
    )
    hf.chat_template = EMBEDDED_CHAT_TEMPLATE
    return hf


def _fast_tokenizer(tok, input_names: list[str], **special_tokens):
    """The transformers fast tokenizer of an offline ``tokenizers`` one (right padding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=EMBEDDED_MODEL_MAX_LENGTH,
        padding_side="right",
        model_input_names=input_names,
        **special_tokens,
    )


def _train_wordpiece_vocab(
    tok, texts: list[str], vocab_size: int, specials: list[str] = _SPECIAL_TOKENS
) -> dict[str, int]:
    """Deterministic frequency-based WordPiece vocabulary (the ``tokenizers`` WordPieceTrainer
    breaks count ties by hash-map order, so its vocabulary differs between runs).

    Ids: the specials (fixed ids 0, 1, ...), every character seen plus ASCII letters / digits /
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
    ordered: list[str] = list(specials) + chars + ["##" + c for c in chars]
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


def build_tokenizer(
    name: str | None, corpus_texts: list[str] | None = None, *, causal_lm: bool = False
):
    """``"embedded"``: an offline BERT-style WordPiece tokenizer trained on ``corpus_texts`` (the
    synthetic corpus when None), or with ``causal_lm=True`` the offline decoder tokenizer (BOS /
    EOS / pad, chat template; the synthetic instruction corpus when None); any other name/path:
    ``AutoTokenizer.from_pretrained(name)`` (``causal_lm`` changes nothing there)."""
    if name is None:
        raise DataError("model.tokenizer is None: pass the teacher's name/path or 'embedded'")
    if name == "embedded":
        if causal_lm:
            return _build_embedded_decoder_tokenizer(corpus_texts)
        return _build_embedded_tokenizer(corpus_texts)
    from transformers import AutoTokenizer

    from ..tasks import hf

    try:
        if hf.gguf_parts(name) is not None:
            return hf.load_gguf_tokenizer(name, "model.tokenizer")
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure is reported as a DataError
        raise DataError(
            f"could not load tokenizer {name!r} (not a local tokenizer folder, or the Hugging "
            f"Face Hub is unreachable): {type(e).__name__}: {e}"
        ) from e


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def own_tokenizer(name: str):
    """The tokenizer saved with a model (a local folder, or a hub name whose tokenizer files are
    already in the local cache), or None when there is none to compare with: ``embedded:``
    names, a folder without tokenizer files, a hub name not cached (nothing is downloaded)."""
    import os

    from transformers import AutoTokenizer

    if name.startswith("embedded:") or name.lower().endswith(".gguf"):
        return None  # a GGUF file carries its tokenizer: the run's tokenizer is read from it
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            return None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = [try_to_load_from_cache(name, f) for f in _TOKENIZER_FILES[:2]]
        except Exception:  # noqa: BLE001 - not a valid repo id
            return None
        if not any(isinstance(c, str) for c in cached):
            return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - nothing to compare with
        return None
