"""Compare two runs token by token from their TOKEN_LOSS_PATH dumps on the same val data, and look inside.

    python3 records/compare.py A.npy B.npy --data-path data/datasets/fineweb10B_sp1024 \
        --tokenizer data/tokenizers/fineweb_1024_bpe.model [--html view.html --docs 0,5] [--block-docs 16]

Prints bpb of each run, B - A with a paired confidence interval (over documents, or blocks of documents),
bpb per token class (digits, punctuation, word starts, ...; rare tokens apart) and the documents that moved
most; --html writes a self-contained page with each token coloured by its loss or by B - A. One dump alone
(A.npy) gives its bpb, classes and page. A dump holds float32 losses in nats, entry i for val token i+1.
Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import glob
import html
import math
import os
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import logparse as lp
from significance import paired_ratio_ci

REPO_ROOT = Path(__file__).resolve().parent.parent
BOS_ID = 1
LN2 = math.log(2.0)
CLASS_NAMES = ("boundary", "byte", "digit", "punct", "word_start", "word_cont")
RARE_SHARE = 0.05  # rare tokens: the least frequent ids that together make up 5% of the val targets


class CompareError(Exception):
    pass


# -----------------------------
# DATA: val tokens, bytes per target, token classes
# -----------------------------

def val_pattern(data_path: str) -> str:
    # Val token shards only: never the fineweb_val_bytes_* byte sidecar beside them (CaseOps data).
    if any(ch in data_path for ch in "*?["):
        return data_path
    for name in ("fineweb_val_[0-9]*.bin", "*val_[0-9]*.bin"):
        pattern = os.path.join(data_path, name)
        if glob.glob(pattern):
            return pattern
    raise CompareError(f"no val shards (fineweb_val_<n>.bin or *val_<n>.bin) under {data_path}")


def import_train_gpt():
    """train_gpt.py's data and byte-counting helpers, so bytes are counted exactly as the scorer counts them."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import train_gpt
        for name in ("load_validation_tokens", "val_byte_counter", "count_target_bytes", "check_tokenizer_sha256"):
            getattr(train_gpt, name)
    except (ImportError, AttributeError) as exc:
        raise CompareError(f"compare needs train_gpt.py's load_validation_tokens, val_byte_counter and "
                           f"count_target_bytes from {REPO_ROOT}: {exc}") from None
    return train_gpt


def load_val_and_bytes(pattern: str, sp, tokenizer_path: str, chunk: int = 1 << 23,
                       allow_other_tokenizer: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(val tokens as int32, bytes of each target token i+1) counted as the scorer counts them: the val byte sidecar
    beside the shards when there is one (CaseOps data), else the tokenizer's tables, which must be the ones the
    shards were built with (their manifest.json's tokenizer sha256) unless allow_other_tokenizer."""
    import torch
    tg = import_train_gpt()
    where = SimpleNamespace(data_path=str(Path(pattern).parent), tokenizer_path=tokenizer_path,
                            vocab_size=sp.get_piece_size())
    try:
        tokens = tg.load_validation_tokens(pattern).to(torch.int64)
        check = tg.check_tokenizer_sha256(where.data_path, tokenizer_path, allow_other_tokenizer,
                                          "--allow-other-tokenizer")
        counter = tg.val_byte_counter(where, sp, tokens.numel(), torch.device("cpu"))
    except tg.ConfigError as exc:
        raise CompareError(str(exc)) from None
    if check.startswith("warning:"):
        print(check, file=sys.stderr)
    if isinstance(counter, torch.Tensor):  # the sidecar: bytes per val token, target i+1's at i+1
        return tokens.to(torch.int32).numpy(), counter[1:].numpy().astype(np.int32)
    nbytes = np.empty(tokens.numel() - 1, dtype=np.int32)
    for start in range(0, tokens.numel() - 1, chunk):  # chunks bound the memory on the 62M-token split
        stop = min(start + chunk, tokens.numel() - 1)
        nbytes[start:stop] = tg.count_target_bytes(tokens[start:stop], tokens[start + 1:stop + 1], counter).numpy()
    return tokens.to(torch.int32).numpy(), nbytes


def token_class_lut(sp) -> np.ndarray:
    """Class index (into CLASS_NAMES) of every vocabulary id, from its SentencePiece piece."""
    lut = np.zeros(sp.get_piece_size(), dtype=np.int8)
    for i in range(len(lut)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            cls = "boundary"
        elif sp.is_byte(i):
            cls = "byte"
        else:
            piece = sp.id_to_piece(i)
            rest = piece[1:] if piece.startswith("\u2581") else piece
            if rest and rest.isdigit():
                cls = "digit"
            elif all(unicodedata.category(ch)[0] in "PSZ" for ch in rest.replace("\u2581", " ")):
                cls = "punct"  # punctuation, symbols and bare spaces
            elif piece.startswith("\u2581"):
                cls = "word_start"
            else:
                cls = "word_cont"
        lut[i] = CLASS_NAMES.index(cls)
    return lut


def rare_ids(targets: np.ndarray, vocab_size: int, share: float = RARE_SHARE) -> np.ndarray:
    """Boolean per id: the least frequent ids (in these targets) that together cover at most `share` of them."""
    counts = np.bincount(targets, minlength=vocab_size)
    present = np.flatnonzero(counts)
    order = present[np.argsort(counts[present], kind="stable")]
    covered = np.cumsum(counts[order])
    rare = np.zeros(len(counts), dtype=bool)
    rare[order[covered <= share * len(targets)]] = True
    return rare


# -----------------------------
# ANALYSIS (numpy only: the tests feed it synthetic arrays)
# -----------------------------

def target_docs(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """Document index of every target (token i+1); a document starts at its BOS, which is its first target.

    Tokens before the first BOS (none in the challenge's shards) form document 0.
    """
    doc = np.cumsum(tokens == bos_id) - (1 if len(tokens) and tokens[0] == bos_id else 0)
    return doc[1:]


def doc_starts_of(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """First token of every document, numbered as target_docs numbers them."""
    starts = np.flatnonzero(tokens == bos_id)
    return starts if len(starts) and starts[0] == 0 else np.concatenate([[0], starts]).astype(np.int64)


def bpb(loss_sum_nats: float, nbytes: float) -> float:
    return loss_sum_nats / LN2 / nbytes if nbytes else math.nan


def per_unit_sums(losses: np.ndarray, nbytes: np.ndarray, unit: np.ndarray):
    """(loss sum, byte sum, target count) per unit (document or block), float64 sums."""
    n = int(unit.max()) + 1 if len(unit) else 0
    return (np.bincount(unit, weights=losses, minlength=n), np.bincount(unit, weights=nbytes, minlength=n),
            np.bincount(unit, minlength=n))


def paired_difference(loss_a, loss_b, nbytes, docs, block_docs: int = 1, level: float = 0.95) -> dict:
    """bpb(B) - bpb(A) with a confidence interval paired over documents (or blocks of block_docs documents)."""
    unit = docs // block_docs
    diff_bits = np.bincount(unit, weights=(loss_b.astype(np.float64) - loss_a) / LN2)
    unit_bytes = np.bincount(unit, weights=nbytes)
    keep = unit_bytes > 0  # units without bytes carry no bpb weight (an empty document)
    result = paired_ratio_ci(diff_bits[keep], unit_bytes[keep], level)
    result["better_share"] = float(np.mean(diff_bits[keep] < 0))  # units where B has lower loss
    result["unit"] = "document" if block_docs == 1 else f"block of {block_docs} documents"
    return result


def class_rows(loss_a, loss_b, nbytes, classes, names) -> list[dict]:
    """Per class: tokens, bytes, bpb of each run and the class's share of the total B - A in bpb.

    The contributions of disjoint classes sum to the total difference.
    """
    total_bytes = float(nbytes.sum())
    rows = []
    for c, name in enumerate(names):
        mask = classes == c
        if not mask.any():
            continue
        row = {"class": name, "tokens": int(mask.sum()), "bytes": int(nbytes[mask].sum()),
               "loss_a": float(loss_a[mask].astype(np.float64).sum())}
        row["bpb_a"] = bpb(row["loss_a"], row["bytes"])
        if loss_b is not None:
            row["loss_b"] = float(loss_b[mask].astype(np.float64).sum())
            row["bpb_b"] = bpb(row["loss_b"], row["bytes"])
            row["contribution"] = (row["loss_b"] - row["loss_a"]) / LN2 / total_bytes
        rows.append(row)
    return rows


# -----------------------------
# PER-TOKEN VIEW (self-contained HTML)
# -----------------------------

def piece_text(piece: str) -> tuple[str, str]:
    """(visible text, extra css class) of a piece: U+2581 is a space, <0x0A> a line break, other bytes boxed."""
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        if piece == "<0x0A>":
            return "\u21b5\n", "nl"
        return piece[1:-1], "byte"
    return piece.replace("\u2581", " "), ""


def _colour(value: float, scale: float, diverging: bool) -> str:
    level = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    if diverging:  # red: B worse than A, blue: B better
        rgb = (220, 40, 40) if value > 0 else (40, 90, 220)
    else:
        rgb = (230, 90, 20)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{level * 0.85:.3f})"


def render_html(tokens, pieces, loss_a, loss_b, nbytes, docs_shown: list[int], doc_starts: np.ndarray,
                colour_by: str, labels: tuple[str, str], summary_lines: list[str], max_tokens: int = 4000) -> str:
    """One page, no external resources: each token a span coloured by its loss or by B - A, numbers on hover."""
    diverging = colour_by == "diff"
    values_by_doc, spans_by_doc = [], []
    for d in docs_shown:
        start = int(doc_starts[d])
        stop = int(doc_starts[d + 1]) if d + 1 < len(doc_starts) else len(tokens)
        stop = min(stop, start + max_tokens, len(loss_a) + 1)
        idx = np.arange(max(start, 1), stop)  # token j is scored by loss[j - 1]; the stream's first is not
        la = loss_a[idx - 1].astype(np.float64)
        lb = loss_b[idx - 1].astype(np.float64) if loss_b is not None else None
        vals = {"diff": (lb - la) if lb is not None else la, "a": la, "b": lb if lb is not None else la}[colour_by]
        values_by_doc.append(vals)
        spans_by_doc.append((d, start, stop, idx, la, lb, vals))
    shown = np.concatenate(values_by_doc) if values_by_doc else np.zeros(1)
    scale = float(np.percentile(np.abs(shown), 99)) if len(shown) else 1.0
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>per-token loss</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
           ".doc{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;padding:.8em}",
           ".t{border-radius:2px}.t:hover{outline:1px solid #000}",
           ".byte{font-size:70%;border:1px dotted #888}.nl{color:#999}",
           ".key span{display:inline-block;width:4em;text-align:center;margin-right:2px}",
           "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}</style></head><body>",
           "<h1>Per-token loss</h1>",
           f"<pre>{html.escape(chr(10).join(summary_lines))}</pre>"]
    if diverging:
        legend = (f"Colour: {html.escape(labels[1])} minus {html.escape(labels[0])}, in nats per token; "
                  f"red where {html.escape(labels[1])} is worse, blue where it is better; full colour at "
                  f"|B - A| >= {scale:.3f} nats (99th percentile of the tokens shown).")
        key = [-scale, -scale / 2, 0, scale / 2, scale]
    else:
        run = labels[1] if colour_by == "b" else labels[0]
        legend = (f"Colour: loss of {html.escape(run)} in nats per token; full colour at >= {scale:.3f} nats "
                  f"(99th percentile of the tokens shown).")
        key = [0, scale / 4, scale / 2, 3 * scale / 4, scale]
    out.append(f"<p>{legend} Hover a token for its id, piece, losses and bytes. The first token of each "
               f"document is its BOS, scored from the previous document's context.</p>")
    out.append("<p class='key'>" + "".join(
        f"<span style='background:{_colour(v, scale, diverging)}'>{v:+.2f}</span>" for v in key) + "</p>")
    for d, start, stop, idx, la, lb, vals in spans_by_doc:
        nb = nbytes[idx - 1]
        head = f"document {d}: tokens {start}..{stop - 1}, {int(nb.sum()):,} bytes, bpb {labels[0]} " \
               f"{bpb(la.sum(), nb.sum()):.4f}"
        if lb is not None:
            head += f", {labels[1]} {bpb(lb.sum(), nb.sum()):.4f} (B - A {bpb(lb.sum() - la.sum(), nb.sum()):+.4f})"
        out.append(f"<h2>{html.escape(head)}</h2>")
        spans = []  # joined without separators: the div keeps whitespace, so a newline would show
        for k, j in enumerate(idx):
            piece = pieces[int(tokens[j])]
            text, css = piece_text(piece)
            tip = f"id {int(tokens[j])} {piece!r} | {labels[0]} {la[k]:.3f} nats"
            if lb is not None:
                tip += f" | {labels[1]} {lb[k]:.3f} | B-A {lb[k] - la[k]:+.3f}"
            tip += f" | {int(nb[k])} bytes"
            text = "\u27e8BOS\u27e9" if int(tokens[j]) == BOS_ID else text
            spans.append(f"<span class='t{' ' + css if css else ''}' style='background:"
                         f"{_colour(vals[k], scale, diverging)}' title='{html.escape(tip, quote=True)}'>"
                         f"{html.escape(text)}</span>")
        out.append("<div class='doc'>" + "".join(spans) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)


# -----------------------------
# REPORT
# -----------------------------

def load_losses(path: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not a .npy array ({exc})") from None
    if arr.ndim != 1 or arr.dtype.kind != "f":
        raise CompareError(f"{path}: expected a 1-D float array of per-token losses, got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        raise CompareError(f"{path}: holds NaN or inf losses")
    return arr


def analyse(tokens: np.ndarray, nbytes: np.ndarray, loss_a: np.ndarray, loss_b: np.ndarray | None,
            class_lut: np.ndarray, block_docs: int = 1, labels=("A", "B"), top: int = 5) -> tuple[list[str], dict]:
    """The text report and the numbers behind it."""
    n = len(loss_a) if loss_b is None else min(len(loss_a), len(loss_b))
    lines = []
    if n < 2:
        raise CompareError(f"the dumps hold {n} losses; nothing to compare")
    if len(tokens) - 1 < n:
        raise CompareError(f"the dumps hold {n:,} losses but the val data has only {len(tokens):,} tokens "
                           f"(a dump scores tokens 1..N-1): different val data?")
    if n < len(tokens) - 1:
        lines.append(f"warning: the dumps cover the first {n:,} of {len(tokens) - 1:,} val targets; the rest is "
                     f"left out of every figure below")
    if loss_b is not None and len(loss_a) != len(loss_b):
        lines.append(f"warning: {labels[0]} has {len(loss_a):,} losses and {labels[1]} {len(loss_b):,}; "
                     f"comparing the first {n:,}")
    loss_a = np.asarray(loss_a[:n], dtype=np.float64)
    loss_b = None if loss_b is None else np.asarray(loss_b[:n], dtype=np.float64)
    nbytes, targets = nbytes[:n].astype(np.float64), tokens[1:n + 1]
    docs = target_docs(tokens)[:n]
    total_bytes = nbytes.sum()
    numbers = {"targets": n, "bytes": int(total_bytes), "documents": int(docs.max()) + 1,
               "bpb_a": bpb(loss_a.sum(), total_bytes), "val_loss_a": float(loss_a.mean())}
    lines.append(f"scored: {n:,} targets, {int(total_bytes):,} bytes, {numbers['documents']:,} documents")
    lines.append(f"{labels[0]}: bpb {numbers['bpb_a']:.8f}, val_loss {numbers['val_loss_a']:.8f} nats/token")
    if loss_b is not None:
        numbers.update({"bpb_b": bpb(loss_b.sum(), total_bytes), "val_loss_b": float(loss_b.mean())})
        lines.append(f"{labels[1]}: bpb {numbers['bpb_b']:.8f}, val_loss {numbers['val_loss_b']:.8f} nats/token")
        ci = paired_difference(loss_a, loss_b, nbytes, docs, block_docs)
        numbers["paired"] = ci
        lines.append(f"{labels[1]} - {labels[0]}: {ci['diff']:+.6f} bpb, {int(ci['level'] * 100)}% CI "
                     f"[{ci['lo']:+.6f}, {ci['hi']:+.6f}] (se {ci['se']:.6f}, paired over {ci['units']:,} "
                     f"units, each a {ci['unit']}; negative: {labels[1]} is better); {labels[1]} better on "
                     f"{100 * ci['better_share']:.1f}% of units")
    # token classes, then rare tokens across classes
    rare = rare_ids(targets, len(class_lut))[targets]
    cls = class_lut[targets].astype(np.int64)
    rows = class_rows(loss_a, loss_b, nbytes, cls, CLASS_NAMES)
    rows += class_rows(loss_a, loss_b, nbytes, np.where(rare, 0, 1),  # index 0: the rare row only
                       (f"rare ({RARE_SHARE:.0%} least frequent)",))
    numbers["classes"] = rows
    lines.append("")
    lines.append("per token class (bpb within the class; contribution: its share of the total B - A in bpb)")
    head = f"  {'class':<24}{'tokens':>12}{'share':>8}{'bytes':>13}{'bpb ' + labels[0]:>12}"
    if loss_b is not None:
        head += f"{'bpb ' + labels[1]:>12}{'B - A':>10}{'contrib':>11}"
    lines.append(head)
    for r in rows:
        fmt = lambda v: "       n/a" if math.isnan(v) else f"{v:10.4f}"  # noqa: E731
        row = f"  {r['class']:<24}{r['tokens']:>12,}{r['tokens'] / n:>8.1%}{r['bytes']:>13,}  {fmt(r['bpb_a'])}"
        if loss_b is not None:
            d = r["bpb_b"] - r["bpb_a"] if r["bytes"] else math.nan
            row += f"  {fmt(r['bpb_b'])}{'       n/a' if math.isnan(d) else f'{d:+10.4f}'}{r['contribution']:+11.6f}"
        lines.append(row)
    # documents that moved most (by total bits, so long documents are not drowned by short noisy ones)
    sa, doc_bytes, cnt = per_unit_sums(loss_a, nbytes, docs)
    doc_b = per_unit_sums(loss_b, nbytes, docs)[0] if loss_b is not None else None
    lines.append("")
    if loss_b is not None:
        moved = (doc_b - sa) / LN2
        order = np.argsort(moved, kind="stable")
        picks = [(f"most in favour of {labels[1]} (fewest extra bits)", order[:top]),
                 (f"most against {labels[1]} (most extra bits)", order[::-1][:top])]
        numbers["doc_gain"], numbers["doc_loss"] = int(order[0]), int(order[-1])
    else:
        order = np.argsort(-(sa / np.maximum(doc_bytes, 1)), kind="stable")
        picks = [("hardest documents for " + labels[0], order[:top])]
    for title, chosen in picks:
        lines.append(f"per document, {title}:")
        head = f"  {'doc':>8}{'tokens':>9}{'bytes':>10}{'bpb ' + labels[0]:>12}"
        lines.append(head + (f"{'bpb ' + labels[1]:>12}{'B - A':>10}{'bits':>11}" if loss_b is not None else ""))
        for d in chosen:
            row = f"  {d:>8}{cnt[d]:>9,}{int(doc_bytes[d]):>10,}{bpb(sa[d], doc_bytes[d]):>12.4f}"
            if loss_b is not None:
                row += (f"{bpb(doc_b[d], doc_bytes[d]):>12.4f}{bpb(doc_b[d] - sa[d], doc_bytes[d]):>+10.4f}"
                        f"{(doc_b[d] - sa[d]) / LN2:>+11.1f}")
            lines.append(row)
    return lines, numbers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compare two runs' per-token losses (TOKEN_LOSS_PATH dumps).")
    ap.add_argument("a", help="run A's dump (.npy, float32 nats per target token)")
    ap.add_argument("b", nargs="?", help="run B's dump on the same val data")
    ap.add_argument("--data-path", required=True, help="the val shards' folder (or a glob of them)")
    ap.add_argument("--tokenizer", required=True, help="the SentencePiece .model both runs used")
    ap.add_argument("--allow-other-tokenizer", action="store_true",
                    help="count bytes with a tokenizer other than the one the shards' manifest.json records")
    ap.add_argument("--labels", default="A,B", help="names of the two runs, e.g. GPT,nGPT")
    ap.add_argument("--block-docs", type=int, default=1, help="pair over blocks of this many documents")
    ap.add_argument("--logs", nargs=2, metavar=("LOG_A", "LOG_B"), help="the runs' logs: show the logged scores")
    ap.add_argument("--html", help="write the per-token view to this file")
    ap.add_argument("--docs", help="documents for the view, e.g. 0,5 (default: the largest gain and loss)")
    ap.add_argument("--color", choices=("diff", "a", "b"), help="colour by B - A (default with two dumps) "
                                                                 "or by one run's loss")
    ap.add_argument("--max-doc-tokens", type=int, default=4000, help="cut long documents in the view")
    args = ap.parse_args(argv)
    labels = tuple((args.labels.split(",") + ["A", "B"])[:2])
    try:
        import sentencepiece as spm
        if not Path(args.tokenizer).is_file():
            raise CompareError(f"no tokenizer at {args.tokenizer}")
        if args.block_docs < 1:
            raise CompareError("--block-docs must be >= 1")
        sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
        loss_a = load_losses(args.a)
        loss_b = load_losses(args.b) if args.b else None
        pattern = val_pattern(args.data_path)
        tokens, nbytes = load_val_and_bytes(pattern, sp, args.tokenizer,
                                            allow_other_tokenizer=args.allow_other_tokenizer)
        lines, numbers = analyse(tokens, nbytes, loss_a, loss_b, token_class_lut(sp), args.block_docs, labels)
        lines.insert(0, f"val data: {pattern}, {len(tokens):,} tokens; tokenizer {args.tokenizer}")
        lines.insert(0, f"compare: {labels[0]} = {args.a}" + (f", {labels[1]} = {args.b}" if args.b else ""))
        if args.logs:
            logged = [lp.parse_log(p).submission for p in args.logs]
            for label, s, key in zip(labels, logged, ("bpb_a", "bpb_b")):
                if key in numbers:
                    lines.append(f"logged {label}: {s['what']} val_bpb {s['val_bpb']:.8f} (dump gives "
                                 f"{numbers[key]:.8f}, {numbers[key] - s['val_bpb']:+.2e})")
            if "bpb_b" in numbers:
                lines.append(f"logged B - A: {logged[1]['val_bpb'] - logged[0]['val_bpb']:+.8f} bpb; "
                             f"from the dumps {numbers['bpb_b'] - numbers['bpb_a']:+.8f}")
        print("\n".join(lines))
        if args.html:
            doc_starts = doc_starts_of(tokens)
            if args.docs:
                docs = [int(d) for d in args.docs.split(",") if d.strip()]
            elif loss_b is not None:
                docs = sorted({numbers["doc_gain"], numbers["doc_loss"]})
            else:
                docs = list(range(min(2, len(doc_starts))))
            bad = [d for d in docs if not 0 <= d < len(doc_starts)]
            if bad:
                raise CompareError(f"--docs {bad}: the val data has documents 0..{len(doc_starts) - 1}")
            pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
            colour = args.color or ("diff" if loss_b is not None else "a")
            if colour != "a" and loss_b is None:
                raise CompareError(f"--color {colour} needs a second dump")
            page = render_html(tokens, pieces, loss_a, loss_b, nbytes, docs, doc_starts, colour, labels,
                               lines, args.max_doc_tokens)
            Path(args.html).write_text(page, encoding="utf-8")
            print(f"wrote {args.html} (documents {', '.join(map(str, docs))})")
    except (CompareError, lp.LogError, OSError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
