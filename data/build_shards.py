"""Build challenge-format token shards (and optionally a SentencePiece tokenizer) from local text, offline.

Usage:
  python3 data/build_shards.py --docs val.jsonl.xz train.jsonl.xz --val-docs 7039 \
      --out-dir data/datasets/blogs_sp1024 --train-tokenizer data/tokenizers/blogs_1024_bpe.model --vocab-size 1024
  python3 data/build_shards.py --embedded --out-dir data/datasets/smoke_sp1024 \
      --train-tokenizer data/tokenizers/smoke_1024_bpe.model --vocab-size 1024
  python3 data/build_shards.py --docs data/docs_selected.jsonl --val-docs 50000 --caseops \
      --out-dir data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved \
      --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
Documents keep the order of --docs (folders sorted), so the first file can serve as the val split.
A manifest.json beside the shards records the split; train_gpt.py refuses a challenge build whose val split
is not the challenge's first 50,000 documents.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import random
import re
import sys
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm

# -----------------------------
# SHARD FORMAT
# -----------------------------
# header: 256 little-endian int32 [magic, version, num_tokens, 0...], then num_tokens little-endian uint16

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 1 << 16  # tokens are stored as uint16


def write_shard(path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise ValueError(f"{path}: token ids must lie in [0, {MAX_VOCAB}) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def shard_problem(path) -> str | None:
    """Why the file at path is not a valid shard, or None when it is one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if len(raw) < HEADER_BYTES:
        return f"{size} bytes, shorter than the {HEADER_BYTES}-byte header"
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        return f"magic {header[0]} instead of {SHARD_MAGIC}"
    if header[1] != SHARD_VERSION:
        return f"version {header[1]} instead of {SHARD_VERSION}"
    expected = HEADER_BYTES + 2 * int(header[2])
    if size != expected:
        return f"{size} bytes where a {header[2]}-token shard has {expected}"
    return None


class ShardWriter:
    """Cuts one split's token stream into fineweb_<split>_%06d.bin files; documents may straddle two shards.
    split "val_bytes" is the val byte sidecar: fed in step with "val", it is cut at the same places."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, log):
        self.out_dir, self.split, self.shard_tokens, self.log = out_dir, split, shard_tokens, log
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.tokens = 0
        self.files: list[str] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        self.tokens += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            self.pending = [stream[self.shard_tokens :]]
            self.pending_tokens = self.pending[0].size

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        write_shard(path, tokens)
        self.files.append(str(path))
        self.log(f"shard_written path:{path} tokens:{tokens.size}")


# -----------------------------
# DOCUMENT READING
# -----------------------------


class UsageError(ValueError):
    """A bad input the user can fix; main() prints it as one line and exits 2."""


DOC_FORMATS = (".txt", ".jsonl")
OPENERS = {".gz": gzip.open, ".xz": lzma.open}


def doc_format(path: Path) -> str | None:
    """'.txt' or '.jsonl' for supported files (optionally .gz/.xz), else None."""
    inner = path.with_suffix("") if path.suffix in OPENERS else path
    return inner.suffix if inner.suffix in DOC_FORMATS else None


def expand_doc_paths(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and doc_format(p))
            if not found:
                raise UsageError(f"--docs {path}: folder holds no .txt or .jsonl files (optionally .gz/.xz)")
            files += found
        elif path.is_file():
            if not doc_format(path):
                raise UsageError(f"--docs {path}: unknown extension; use .txt or .jsonl, optionally .gz or .xz")
            files.append(path)
        else:
            raise UsageError(f"--docs {path}: no such file or folder; check the path")
    return files


def txt_documents(f, mode: str):
    if mode == "file":
        yield f.read()
    elif mode == "line":
        yield from f
    else:  # blank: paragraphs separated by whitespace-only lines
        lines = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
        if lines:
            yield "".join(lines)


def jsonl_documents(f, path: Path, text_field: str):
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--docs {path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line")
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UsageError(f"--docs {path}:{lineno}: no string field {text_field!r}; name it with --text-field")
        yield text


def read_documents(paths, *, txt_docs="blank", text_field="text", max_docs=None) -> list[str]:
    docs = []
    for path in expand_doc_paths(paths):
        if max_docs is not None and len(docs) >= max_docs:
            break
        before = len(docs)
        try:
            with OPENERS.get(path.suffix, open)(path, "rt", encoding="utf-8") as f:
                is_jsonl = doc_format(path) == ".jsonl"
                for text in jsonl_documents(f, path, text_field) if is_jsonl else txt_documents(f, txt_docs):
                    text = text.strip()  # like the challenge's export; empty documents would be a bare BOS
                    if text:
                        docs.append(text)
                        if max_docs is not None and len(docs) >= max_docs:
                            break
        except (OSError, EOFError, lzma.LZMAError, zlib.error, UnicodeDecodeError) as exc:
            raise UsageError(f"--docs {path}: cannot read it as UTF-8 text ({exc}); check the file and its compression")
        if len(docs) == before:
            raise UsageError(f"--docs {path}: no documents in it; drop it or check --txt-docs/--text-field")
    return docs


# -----------------------------
# EMBEDDED CORPUS
# -----------------------------
# English that ships with every Python, so a smoke dataset builds offline: help() topics + stdlib docstrings.

EMBEDDED_SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "idlelib", "site-packages", "__pycache__"}
EMBEDDED_MIN_DOC_BYTES = 64
EMBEDDED_SHUFFLE_SEED = 1337
EMBEDDED_VAL_DOCS = 80  # ~137k of ~776k tokens at vocab 1024 on Python 3.11.7; the build prints the exact count


def module_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings, joined with blank lines; parsed, never imported."""
    with warnings.catch_warnings():  # old escape sequences in a few stdlib files warn on parse
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_bytes(), filename=str(path))
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(doc for doc in docs if doc)


def embedded_documents() -> list[str]:
    import pydoc_data.topics  # imported here: only --embedded needs it

    docs = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if EMBEDDED_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            docs.append(module_docstrings(path))
        except (SyntaxError, ValueError):  # a file the running parser rejects has nothing to give
            continue
    return [doc for doc in docs if len(doc.encode()) >= EMBEDDED_MIN_DOC_BYTES]


# -----------------------------
# CASEOPS
# -----------------------------
# The lossless case transform of the CaseOps records (lossless_caps_caseops_v1, openai/parameter-golf #1729,
# #1855): over each run of ASCII letters, a lowercase word stays, an ALLCAPS word (2+ letters) becomes ALLCAPS +
# lowercase, a Titlecase word TITLE + lowercase, any other word TITLE (if its first letter is a capital) and
# CAPNEXT before each later capital, all lowercased; a literal marker character is escaped as ESC + itself.
# The markers are private-use characters that the CaseOps tokenizer holds as user-defined pieces.

CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_MARKERS = (CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC)
CASEOPS_UNIT = re.compile("[A-Za-z]+|[\ue001-\ue004]")
CASEOPS_MARKER = re.compile("[\ue001-\ue004]")


def _caseops_unit(match: re.Match) -> str:
    word = match.group()
    if word in CASEOPS_MARKERS:
        return CASEOPS_ESC + word
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return CASEOPS_ALLCAPS + lower
    if word[0].isupper() and word[1:].islower():
        return CASEOPS_TITLE + lower
    head = CASEOPS_TITLE + lower[0] if word[0].isupper() else lower[0]  # "iPhone", "OpenAI", a lone "A"
    return head + "".join(CASEOPS_CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def caseops_encode(text: str) -> str:
    return CASEOPS_UNIT.sub(_caseops_unit, text)


def original_bytes_per_char(encoded: str) -> np.ndarray:
    """For each character of a CaseOps-encoded text, the UTF-8 bytes of the original text it stands for:
    markers 0 (an escaped marker character is text: its own 3 bytes), every other character its own length
    (lowercasing an ASCII letter keeps its 1 byte)."""
    codepoints = np.frombuffer(encoded.encode("utf-32-le"), dtype="<u4")
    weights = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    escaped = -1
    for m in CASEOPS_MARKER.finditer(encoded):
        if m.start() == escaped:  # the literal after ESC
            continue
        weights[m.start()] = 0
        if m.group() == CASEOPS_ESC:
            escaped = m.start() + 1
    return weights


def caseops_tokens_and_bytes(sp, doc: str) -> tuple[list[int], np.ndarray]:
    """A document's CaseOps tokens and, per token, the bytes of the original document it covers (they sum to
    the document's UTF-8 length): what the val byte sidecar records, so bpb counts the untransformed text."""
    encoded = caseops_encode(doc)
    mapping = sp.encode_as_offset_mapping(encoded)  # per token: (start, end) in characters of `encoded`
    cumulative = np.concatenate([[0], np.cumsum(original_bytes_per_char(encoded))])
    ends = np.array([end for _, end in mapping["offsets"]], dtype=np.int64)
    if ends.size:
        ends[-1] = len(encoded)  # characters the normalizer dropped at the end still belong to the document
    return mapping["ids"], np.diff(cumulative[ends], prepend=0)


# -----------------------------
# TOKENIZER
# -----------------------------

DEFAULT_TOKENIZER_TRAIN_BYTES = 50_000_000
SENTENCEPIECE_SETTINGS = dict(  # the challenge's tokenizer settings
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=BOS_ID,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
    minloglevel=2,  # errors only: build() logs its own progress
)
ENCODE_BATCH_DOCS = 1024  # small enough to balance many workers
PROGRESS_EVERY_BATCHES = 16


def check_tokenizer_args(tokenizer_path, train_tokenizer: bool, vocab_size) -> None:
    """Cheap checks run before any document is read."""
    path = Path(tokenizer_path)
    if train_tokenizer:
        if vocab_size is None:
            raise UsageError("--train-tokenizer needs --vocab-size (e.g. --vocab-size 1024)")
        if not 0 < vocab_size <= MAX_VOCAB:
            raise UsageError(f"--vocab-size {vocab_size}: shards store uint16 tokens, use 1..{MAX_VOCAB}")
        if path.suffix != ".model":
            raise UsageError(f"--train-tokenizer {path}: name must end in .model (the .vocab goes beside it)")
    elif not path.is_file():
        raise UsageError(f"--tokenizer {path}: no such file; pass an existing .model or use --train-tokenizer")


def check_outputs(out_dir, tokenizer_path, train_tokenizer: bool, overwrite: bool) -> None:
    """Nothing already there is deleted or replaced without --overwrite: checked before anything is written."""
    out_dir = Path(out_dir)
    old = sorted(out_dir.glob("fineweb_*.bin")) + sorted(out_dir.glob(MANIFEST_NAME))
    if old and not overwrite:
        raise UsageError(f"--out-dir {out_dir} already holds a dataset ({len(old)} files, e.g. {old[0].name}); "
                         "pass --overwrite to replace it, or give an empty folder")
    if train_tokenizer and Path(tokenizer_path).exists() and not overwrite:
        raise UsageError(f"--train-tokenizer {tokenizer_path} exists; pass --overwrite to replace it, "
                         "or give a new path")


def train_sentencepiece(docs: list[str], model_path: Path, vocab_size: int, max_bytes: int, workers: int, log,
                        caseops: bool = False) -> None:
    sample, sample_bytes = [], 0
    for doc in docs:  # at least one document, then up to max_bytes
        sample.append(caseops_encode(doc) if caseops else doc)
        sample_bytes += len(sample[-1].encode())
        if sample_bytes >= max_bytes:
            break
    log(f"tokenizer_train docs:{len(sample)} bytes:{sample_bytes} vocab_size:{vocab_size} caseops:{int(caseops)} "
        f"path:{model_path}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            **SENTENCEPIECE_SETTINGS,
            user_defined_symbols=list(CASEOPS_MARKERS) if caseops else [],  # one piece per marker, like #1729's
            sentence_iterator=iter(sample),
            model_prefix=str(model_path.with_suffix("")),
            vocab_size=vocab_size,
            num_threads=workers,
            # whole documents: the trainer silently drops sentences longer than this (default 4192 bytes)
            max_sentence_length=max(len(doc.encode()) for doc in sample) + 1,
        )
    except RuntimeError as exc:  # e.g. a vocab too small for the byte-fallback pieces and the alphabet
        raise UsageError(f"--vocab-size {vocab_size}: sentencepiece cannot train ({str(exc).splitlines()[0]})")


def load_tokenizer(path: Path, caseops: bool = False) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"--tokenizer {path}: not a SentencePiece model ({str(exc).splitlines()[0]})")
    if sp.vocab_size() > MAX_VOCAB:
        raise UsageError(f"--tokenizer {path}: vocab {sp.vocab_size()} > {MAX_VOCAB} does not fit uint16 shards")
    if sp.bos_id() != BOS_ID:
        raise UsageError(f"--tokenizer {path}: bos_id {sp.bos_id()}, shards need {BOS_ID}; use --train-tokenizer")
    if caseops and sp.unk_id() in map(sp.piece_to_id, CASEOPS_MARKERS):
        raise UsageError(f"--tokenizer {path}: no pieces for the CaseOps markers U+E001-U+E004; use the CaseOps "
                         "tokenizer (fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model) or --train-tokenizer")
    return sp


def encode_docs(sp, docs: list[str], caseops: bool = False, with_bytes: bool = False):
    """BOS before each document, then its tokens, all concatenated (built flat: no array per document), and
    with_bytes (CaseOps only): each token's bytes of the original document, BOS 0, else None."""
    if with_bytes:
        ids, doc_bytes = zip(*(caseops_tokens_and_bytes(sp, doc) for doc in docs))
    else:
        ids = sp.encode([caseops_encode(doc) for doc in docs] if caseops else docs)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    is_bos = np.zeros(tokens.size, dtype=bool)
    is_bos[np.cumsum(lengths) - lengths] = True
    tokens[is_bos] = BOS_ID
    tokens[~is_bos] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=tokens.size - len(ids))
    if not with_bytes:
        return tokens, None
    counts = np.zeros(tokens.size, dtype=np.int64)
    counts[~is_bos] = np.concatenate(doc_bytes)
    return tokens, counts


_worker_sp = None  # each pool process loads the model once


def _load_worker_tokenizer(model_path: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_in_worker(job: tuple) -> tuple:
    return encode_docs(_worker_sp, *job)


def encode_batches(sp, model_path: Path, batches: list[tuple], workers: int):
    """encode_docs over batches of (docs, caseops, with_bytes), in order; processes, because sentencepiece's
    num_threads barely helps."""
    if workers == 1 or len(batches) == 1:
        yield from (encode_docs(sp, *batch) for batch in batches)
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once the caller (e.g. train_gpt.py) runs threads
    with ctx.Pool(min(workers, len(batches)), _load_worker_tokenizer, (str(model_path),)) as pool:
        yield from pool.imap(_encode_in_worker, batches)


# -----------------------------
# BUILD
# -----------------------------


MANIFEST_NAME = "manifest.json"  # beside the shards; train_gpt.py reads it


def build(
    docs: list[str],
    out_dir,
    tokenizer_path,
    *,
    vocab_size=None,
    train_tokenizer=False,
    val_docs,
    caseops=False,
    variant=None,
    challenge_docs=False,
    shuffle_seed=None,
    shard_tokens=100_000_000,
    overwrite=False,
    tokenizer_train_bytes=DEFAULT_TOKENIZER_TRAIN_BYTES,
    workers=None,
    log=print,
) -> dict:
    """Val = docs[:val_docs], train = the rest less exact copies of a val document; a trained tokenizer sees
    train docs only (no val leakage). caseops: CaseOps-encode the text and write the val byte sidecar.
    Writes manifest.json beside the shards: variant (default: the folder's name), tokenizer hash, split.
    overwrite: replace the shards already in out_dir and a trained tokenizer's file (else refused)."""
    t0 = time.perf_counter()
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    workers = workers or os.cpu_count() or 1
    if shard_tokens < 1 or workers < 1:
        raise UsageError(f"--shard-tokens {shard_tokens} and --workers {workers} must both be >= 1")
    check_tokenizer_args(tokenizer_path, train_tokenizer, vocab_size)
    check_outputs(out_dir, tokenizer_path, train_tokenizer, overwrite)
    if not 0 < val_docs < len(docs):
        raise UsageError(f"--val-docs {val_docs}: need 1 <= val-docs < {len(docs)} (the document count)")
    val = docs[:val_docs]
    val_texts = set(val)
    train = [doc for doc in docs[val_docs:] if doc not in val_texts]  # a repeated val document is val, not train
    if len(train) < len(docs) - val_docs:
        log(f"dropped_train_docs:{len(docs) - val_docs - len(train)} (exact copies of val documents)")
    if not train:
        raise UsageError(f"--val-docs {val_docs}: no train documents are left; use more documents")
    if train_tokenizer:
        train_sentencepiece(train, tokenizer_path, vocab_size, tokenizer_train_bytes, workers, log, caseops)
    sp = load_tokenizer(tokenizer_path, caseops)

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("fineweb_train_*.bin")) + sorted(out_dir.glob("fineweb_val_*.bin"))
    for path in stale:  # a loader globs the folder: old shards would silently join the new dataset
        path.unlink()
    if stale:
        log(f"removed_stale_shards:{len(stale)} out_dir:{out_dir}")
    splits = ("val", "train") + (("val_bytes",) if caseops else ())
    writers = {split: ShardWriter(out_dir, split, shard_tokens, log) for split in splits}
    # batches never straddle the val/train boundary, so one pool serves both splits
    batches = [
        (split, part[i : i + ENCODE_BATCH_DOCS])
        for split, part in (("val", val), ("train", train))
        for i in range(0, len(part), ENCODE_BATCH_DOCS)
    ]
    jobs = [(batch, caseops, caseops and split == "val") for split, batch in batches]
    encoded = encode_batches(sp, tokenizer_path, jobs, workers)
    docs_done = 0
    for n, ((split, batch), (tokens, counts)) in enumerate(zip(batches, encoded, strict=True), 1):
        writers[split].add(tokens)
        if counts is not None:
            writers["val_bytes"].add(counts)
        docs_done += len(batch)
        if n % PROGRESS_EVERY_BATCHES == 0 or n == len(batches) or batches[n][0] != split:
            log(f"encode split:{split} docs:{docs_done}/{len(val) + len(train)} tokens:{writers[split].tokens} "
                f"time:{int(1000 * (time.perf_counter() - t0))}ms")
    for writer in writers.values():
        writer.close()

    summary = {
        "train_docs": len(train),
        "val_docs": len(val),
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "text_bytes": sum(len(doc.encode()) for doc in itertools.chain(val, train)),
        "vocab_size": sp.vocab_size(),
        "tokenizer": str(tokenizer_path),
        "files": [f for writer in writers.values() for f in writer.files],
    }
    manifest = {
        "variant": variant or out_dir.resolve().name,
        "caseops": caseops,
        "challenge_docs": challenge_docs,
        "tokenizer": tokenizer_path.name,
        "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
        "vocab_size": sp.vocab_size(),
        "shuffle_seed": shuffle_seed,
        "val_docs": len(val),
        "val_tokens": writers["val"].tokens,
        "val_shards": len(writers["val"].files),
        "val_bytes_shards": len(writers["val_bytes"].files) if caseops else 0,
        "train_docs": len(train),
        "train_docs_dropped_as_val_copies": len(docs) - val_docs - len(train),
        "train_tokens": writers["train"].tokens,
        "train_shards": len(writers["train"].files),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log(
        f"summary train_docs:{summary['train_docs']} val_docs:{summary['val_docs']} "
        f"train_tokens:{summary['train_tokens']} val_tokens:{summary['val_tokens']} text_bytes:{summary['text_bytes']} "
        f"tokenizer:{tokenizer_path} vocab_size:{summary['vocab_size']} train_files:{len(writers['train'].files)} "
        f"val_files:{len(writers['val'].files)} caseops:{int(caseops)} out_dir:{out_dir} "
        f"time:{int(1000 * (time.perf_counter() - t0))}ms"
    )
    return summary


# -----------------------------
# COMMAND LINE
# -----------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build challenge-format shards from local documents or embedded text.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--docs", nargs="+", metavar="PATH", help=".txt/.jsonl files or folders, optionally .gz/.xz")
    source.add_argument("--embedded", action="store_true", help="Python's help topics and stdlib docstrings (offline)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH", help="existing SentencePiece .model")
    tok.add_argument("--train-tokenizer", metavar="PATH", help="train a SentencePiece BPE on the train docs into PATH")
    p.add_argument("--vocab-size", type=int, help="vocab size for --train-tokenizer")
    p.add_argument("--out-dir", required=True, help="folder for fineweb_{train,val}_%%06d.bin")
    p.add_argument("--val-docs", type=int, help=f"the first N docs are val (--embedded: {EMBEDDED_VAL_DOCS})")
    p.add_argument("--shuffle-seed", type=int, help=f"shuffle before the split (--embedded: {EMBEDDED_SHUFFLE_SEED})")
    p.add_argument("--max-docs", type=int, help="read at most N documents")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps-encode the text (needs a tokenizer with its markers) and write the val byte sidecar")
    p.add_argument("--variant", help="name recorded in manifest.json (default: the --out-dir folder's name)")
    p.add_argument("--txt-docs", default="blank", choices=("file", "blank", "line"),
                   help=".txt: one doc per file/para/line")
    p.add_argument("--text-field", default="text", help=".jsonl: field holding the text")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards and manifest already in --out-dir and an existing --train-tokenizer file")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--tokenizer-train-bytes", type=int, default=DEFAULT_TOKENIZER_TRAIN_BYTES)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes, tokenizer-training threads")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        tokenizer_path = args.train_tokenizer or args.tokenizer
        check_tokenizer_args(tokenizer_path, bool(args.train_tokenizer), args.vocab_size)
        check_outputs(args.out_dir, tokenizer_path, bool(args.train_tokenizer), args.overwrite)
        if args.embedded:
            docs = embedded_documents()[: args.max_docs]
            shuffle_seed = EMBEDDED_SHUFFLE_SEED if args.shuffle_seed is None else args.shuffle_seed
            val_docs = EMBEDDED_VAL_DOCS if args.val_docs is None else args.val_docs
        else:
            if args.val_docs is None:
                raise UsageError("--docs needs --val-docs N (the first N documents become the val split)")
            docs = read_documents(args.docs, txt_docs=args.txt_docs, text_field=args.text_field, max_docs=args.max_docs)
            shuffle_seed, val_docs = args.shuffle_seed, args.val_docs
        # the challenge's documents come as docs_selected.jsonl (cached_challenge_fineweb.py --with-docs)
        challenge_docs = any(Path(path).name.startswith("docs_selected.") for path in args.docs or ())
        print(f"read docs:{len(docs)} shuffle_seed:{shuffle_seed}", flush=True)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(docs)
        return build(
            docs,
            args.out_dir,
            tokenizer_path,
            vocab_size=args.vocab_size,
            train_tokenizer=bool(args.train_tokenizer),
            val_docs=val_docs,
            caseops=args.caseops,
            variant=args.variant,
            challenge_docs=challenge_docs,
            shuffle_seed=shuffle_seed,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            tokenizer_train_bytes=args.tokenizer_train_bytes,
            workers=args.workers,
            log=lambda msg: print(msg, flush=True),
        )
    except UsageError as exc:
        print(f"build_shards.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
