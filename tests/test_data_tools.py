"""Tests for data/build_shards.py and data/cached_challenge_fineweb.py, CPU and offline.

Usage: python3 -m pytest -q tests/test_data_tools.py
"""

import gzip
import json
import lzma
import random
import shutil
import struct
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import build_shards  # noqa: E402
import cached_challenge_fineweb as downloader  # noqa: E402

# -----------------------------
# HELPERS
# -----------------------------

WORDS = (
    "the of and to in is was for that with as on by at from his her they we you it this be are have had not but "
    "what all were when there can an your which their said if do will each about how up out them then she many "
    "some so these would other into has more two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where most"
).split()
RARE_VAL_WORD = "zyzzogeton"  # only in val docs: a tokenizer trained on train docs must not learn it
NUM_DOCS, NUM_VAL_DOCS, VOCAB_SIZE, SHARD_TOKENS = 80, 8, 384, 1500


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Lower-case ASCII sentences with single spaces: they survive nmt_nfkc encode/decode unchanged."""
    rng = random.Random(seed)
    return [f"doc {i} " + " ".join(rng.choices(WORDS, k=rng.randint(10, 60))) + "." for i in range(n)]


def read_shard(path) -> tuple[np.ndarray, np.ndarray]:
    """Independent reader: header as int32, tokens as uint16, both little-endian."""
    return np.fromfile(path, dtype="<i4", count=256), np.fromfile(path, dtype="<u2", offset=1024)


def split_at_bos(tokens: np.ndarray) -> list[list[int]]:
    assert tokens[0] == build_shards.BOS_ID, "a split must open with BOS"
    starts = np.flatnonzero(tokens == build_shards.BOS_ID)
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


def decoded_docs(sp, files) -> list[str]:
    return [sp.decode(ids) for ids in split_at_bos(np.concatenate([read_shard(f)[1] for f in files]))]


def quiet(*_):
    pass


def one_line_error(capsys, excinfo, code: int) -> str:
    assert excinfo.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def docs() -> list[str]:
    docs = make_docs(NUM_DOCS)
    for i in range(NUM_VAL_DOCS):
        docs[i] += f" {RARE_VAL_WORD}" * 40
    return docs


@pytest.fixture(scope="module")
def built(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    summary = build_shards.build(
        docs, out / "shards", out / "tok.model", vocab_size=VOCAB_SIZE, train_tokenizer=True,
        val_docs=NUM_VAL_DOCS, shard_tokens=SHARD_TOKENS, workers=1, log=quiet,
    )
    return summary, spm.SentencePieceProcessor(model_file=str(out / "tok.model"))


def split_files(summary, split: str) -> list[str]:
    return [f for f in summary["files"] if Path(f).name.startswith(f"fineweb_{split}_")]


# -----------------------------
# SHARD FORMAT
# -----------------------------


def test_write_shard_header_and_tokens_round_trip(tmp_path):
    tokens = [1, 0, 7, 1023, 65535]
    build_shards.write_shard(tmp_path / "s.bin", np.array(tokens))
    header, back = read_shard(tmp_path / "s.bin")
    assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
    assert back.tolist() == tokens
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2 * len(tokens)
    assert build_shards.shard_problem(tmp_path / "s.bin") is None


def test_write_shard_rejects_tokens_outside_uint16(tmp_path):
    with pytest.raises(ValueError):
        build_shards.write_shard(tmp_path / "s.bin", [1, 65536])


def test_shard_problem_names_truncation_and_bad_magic(tmp_path):
    path = tmp_path / "s.bin"
    build_shards.write_shard(path, list(range(100)))
    path.write_bytes(path.read_bytes()[:-2])
    assert "bytes" in build_shards.shard_problem(path)
    build_shards.write_shard(path, [5])
    path.write_bytes(struct.pack("<i", 12345) + path.read_bytes()[4:])
    assert "magic" in build_shards.shard_problem(path)
    path.write_bytes(b"x" * 10)
    assert "shorter" in build_shards.shard_problem(path)


# -----------------------------
# BUILD
# -----------------------------


def test_every_doc_starts_with_bos_and_val_is_first_docs(built, docs):
    summary, sp = built
    val_tokens = np.concatenate([read_shard(f)[1] for f in split_files(summary, "val")])
    assert int((val_tokens == build_shards.BOS_ID).sum()) == NUM_VAL_DOCS
    assert decoded_docs(sp, split_files(summary, "val")) == docs[:NUM_VAL_DOCS]
    assert decoded_docs(sp, split_files(summary, "train")) == docs[NUM_VAL_DOCS:]


def test_train_and_val_splits_are_disjoint(built):
    summary, sp = built
    val, train = (set(decoded_docs(sp, split_files(summary, s))) for s in ("val", "train"))
    assert val and train and not val & train


def test_shards_are_cut_at_shard_tokens_and_summary_matches_files(built, docs):
    summary, _ = built
    for split in ("train", "val"):
        counts = [int(read_shard(f)[0][2]) for f in split_files(summary, split)]
        assert len(counts) > 1 and all(c == SHARD_TOKENS for c in counts[:-1]) and 0 < counts[-1] <= SHARD_TOKENS
        assert sum(counts) == summary[f"{split}_tokens"]
    assert (summary["train_docs"], summary["val_docs"]) == (NUM_DOCS - NUM_VAL_DOCS, NUM_VAL_DOCS)
    assert summary["text_bytes"] == sum(len(d.encode()) for d in docs)
    assert all(build_shards.shard_problem(f) is None for f in summary["files"])


def test_tokenizer_is_trained_without_val_docs(built, docs, tmp_path):
    _, sp = built
    # control: the same trainer fed the val docs too does learn the rare word, so its absence means something
    build_shards.train_sentencepiece(docs, tmp_path / "leaky.model", VOCAB_SIZE, 10**9, 1, quiet)
    leaky = spm.SentencePieceProcessor(model_file=str(tmp_path / "leaky.model"))
    pieces = lambda p: [p.id_to_piece(i) for i in range(p.vocab_size())]  # noqa: E731
    assert any("zyzz" in piece for piece in pieces(leaky))
    assert not any("zyzz" in piece for piece in pieces(sp))


def test_parallel_encoding_matches_single_process(docs, built, tmp_path, monkeypatch):
    monkeypatch.setattr(build_shards, "ENCODE_BATCH_DOCS", 16)  # several batches, so the pool really runs
    tokenizer = built[0]["tokenizer"]
    outputs = []
    for workers in (1, 2):
        summary = build_shards.build(docs, tmp_path / f"w{workers}", tokenizer, val_docs=NUM_VAL_DOCS,
                                     shard_tokens=SHARD_TOKENS, workers=workers, log=quiet)
        outputs.append([Path(f).read_bytes() for f in summary["files"]])
    assert outputs[0] == outputs[1]


def test_rebuild_with_overwrite_removes_stale_shards(docs, built, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    build_shards.write_shard(out / "fineweb_train_000099.bin", [1, 2, 3])
    summary = build_shards.build(docs, out, built[0]["tokenizer"], val_docs=NUM_VAL_DOCS, workers=1, log=quiet,
                                 overwrite=True)
    assert sorted(str(p) for p in out.glob("fineweb_*.bin")) == sorted(summary["files"])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_shards_are_kept_without_overwrite(docs, built, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    build_shards.write_shard(out / "fineweb_val_000000.bin", [1, 2, 3])
    before = snapshot(tmp_path)
    with pytest.raises(build_shards.UsageError, match="--overwrite"):
        build_shards.build(docs, out, built[0]["tokenizer"], val_docs=NUM_VAL_DOCS, workers=1, log=quiet)
    argv = ["--embedded", "--out-dir", str(out), "--tokenizer", built[0]["tokenizer"]]
    with pytest.raises(SystemExit) as excinfo:
        build_shards.main(argv)
    assert f"--out-dir {out} already holds a dataset" in one_line_error(capsys, excinfo, 2)
    assert snapshot(tmp_path) == before


def test_existing_tokenizer_is_kept_without_overwrite(built, tmp_path, capsys):
    tok = tmp_path / "mine.model"
    shutil.copy(built[0]["tokenizer"], tok)
    before = snapshot(tmp_path)
    argv = ["--embedded", "--out-dir", str(tmp_path / "new"), "--train-tokenizer", str(tok), "--vocab-size", "384"]
    with pytest.raises(SystemExit) as excinfo:
        build_shards.main(argv)
    assert f"--train-tokenizer {tok} exists; pass --overwrite" in one_line_error(capsys, excinfo, 2)
    assert snapshot(tmp_path) == before


# -----------------------------
# DOCUMENT READING AND COMMAND LINE
# -----------------------------


def write_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    names = {"txt": "a.txt", "jsonl": "b.jsonl", "gz": "c.jsonl.gz", "xz": "d.jsonl.xz"}
    paths = {kind: folder / name for kind, name in names.items()}
    paths["txt"].write_text("\n\n".join(docs) + "\n")
    paths["jsonl"].write_text(lines)
    with gzip.open(paths["gz"], "wt") as f:
        f.write(lines)
    with lzma.open(paths["xz"], "wt") as f:
        f.write(lines)
    return paths


def test_txt_jsonl_gz_and_xz_read_alike_and_folders_read_sorted(tmp_path):
    docs = make_docs(12, seed=1)
    paths = write_formats(tmp_path, docs)
    for path in paths.values():
        assert build_shards.read_documents([path]) == docs, path
    assert build_shards.read_documents([tmp_path]) == docs * 4
    assert build_shards.read_documents([paths["xz"], paths["txt"]], max_docs=15) == docs + docs[:3]


def test_txt_split_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one two\nthree\n\n  \nfour five\n")
    assert build_shards.read_documents([path], txt_docs="blank") == ["one two\nthree", "four five"]
    assert build_shards.read_documents([path], txt_docs="line") == ["one two", "three", "four five"]
    assert build_shards.read_documents([path], txt_docs="file") == ["one two\nthree\n\n  \nfour five"]


def test_main_builds_from_xz_jsonl_with_existing_tokenizer(built, tmp_path):
    docs = make_docs(30, seed=2)
    paths = write_formats(tmp_path, docs)
    out = tmp_path / "out"
    summary = build_shards.main(["--docs", str(paths["xz"]), "--out-dir", str(out), "--tokenizer",
                                 built[0]["tokenizer"], "--val-docs", "4", "--workers", "1"])
    assert (summary["val_docs"], summary["train_docs"]) == (4, 26)
    assert decoded_docs(built[1], split_files(summary, "val")) == docs[:4]


def test_shuffle_seed_is_deterministic_and_val_stays_first_after_it(built, tmp_path):
    docs = make_docs(30, seed=3)
    path = write_formats(tmp_path, docs)["jsonl"]
    runs = []
    for name in ("a", "b"):
        summary = build_shards.main(["--docs", str(path), "--out-dir", str(tmp_path / name), "--tokenizer",
                                     built[0]["tokenizer"], "--val-docs", "5", "--shuffle-seed", "7", "--workers", "1"])
        runs.append(decoded_docs(built[1], split_files(summary, "val")))
    shuffled = list(docs)
    random.Random(7).shuffle(shuffled)
    assert runs[0] == runs[1] == shuffled[:5] != docs[:5]


@pytest.fixture(scope="module")
def bad_inputs(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n \n\n")
    (root / "docs.csv").write_text("a,b\n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (root / "ok.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(5)))
    # append pieces to a real model (protobuf repeated fields concatenate) until the vocab outgrows uint16
    pieces = b""
    for i in range(65536):
        piece = f"zq{i}".encode()
        inner = b"\x0a" + bytes([len(piece)]) + piece + b"\x15" + struct.pack("<f", -1e4)
        pieces += b"\x0a" + bytes([len(inner)]) + inner
    (root / "huge.model").write_bytes(Path(built[0]["tokenizer"]).read_bytes() + pieces)
    return root


def with_tokenizer(docs_name: str) -> list[str]:
    return ["--docs", f"{{root}}/{docs_name}", "--tokenizer", "{tok}", "--val-docs", "1"]


DOCS_OK = ["--docs", "{root}/ok.jsonl"]
BAD_INPUT_CASES = {  # case: (argv without --out-dir, a fragment the one-line message must hold)
    "missing_docs_path": (with_tokenizer("nope.jsonl"), "nope.jsonl"),
    "file_without_documents": (with_tokenizer("empty.txt"), "no documents"),
    "unknown_extension": (with_tokenizer("docs.csv"), "extension"),
    "invalid_json_line": (with_tokenizer("bad.jsonl"), "bad.jsonl:2"),
    "missing_tokenizer": (DOCS_OK + ["--tokenizer", "{root}/no.model", "--val-docs", "1"], "no.model"),
    "vocab_size_missing": (DOCS_OK + ["--train-tokenizer", "{root}/t.model", "--val-docs", "1"], "--vocab-size"),
    "vocab_size_over_uint16": (DOCS_OK + ["--train-tokenizer", "{root}/t.model", "--vocab-size", "70000"], "uint16"),
    "tokenizer_vocab_over_uint16": (DOCS_OK + ["--tokenizer", "{root}/huge.model", "--val-docs", "1"], "uint16"),
    "val_docs_not_below_doc_count": (DOCS_OK + ["--tokenizer", "{tok}", "--val-docs", "5"], "--val-docs 5"),
    "val_docs_missing": (DOCS_OK + ["--tokenizer", "{tok}"], "--val-docs"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_CASES))
def test_bad_input_exits_2_with_one_line(case, bad_inputs, built, tmp_path, capsys):
    argv, expected = BAD_INPUT_CASES[case]
    argv = [a.format(root=bad_inputs, tok=built[0]["tokenizer"]) for a in argv] + ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as excinfo:
        build_shards.main(argv)
    assert expected in one_line_error(capsys, excinfo, 2)


# -----------------------------
# EMBEDDED CORPUS
# -----------------------------


@pytest.fixture(scope="module")
def embedded() -> list[str]:
    return build_shards.embedded_documents()


def test_embedded_corpus_is_english_and_deterministic(embedded):
    text = "\n".join(embedded)
    assert len(embedded) > 300 and len(text.encode()) > 1_000_000
    assert all(len(d.encode()) >= build_shards.EMBEDDED_MIN_DOC_BYTES for d in embedded)
    assert sum(c.isascii() for c in text) > 0.99 * len(text)
    assert text.count(" the ") > 5000
    assert build_shards.embedded_documents() == embedded


def test_embedded_corpus_has_no_test_package_docstrings(embedded):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    test_files = sorted((stdlib / "test").glob("test_*.py"))[:60] + sorted((stdlib / "unittest" / "test").glob("*.py"))
    if not test_files:
        pytest.skip("this Python ships without its test packages")
    test_docs = [d for d in map(build_shards.module_docstrings, test_files) if len(d) >= 200]
    assert test_docs, "the check needs some sizeable test docstrings"
    corpus = "\n".join(embedded)
    assert not [d[:60] for d in test_docs if d in corpus]


# -----------------------------
# DOWNLOADER
# -----------------------------


class FakeHub:
    """hf_hub_download over a local folder, with a cache that, like the hub's, is reused unless forced."""

    def __init__(self, repo: Path, cache: Path, error: Exception | None = None):
        self.repo, self.cache, self.error, self.calls = repo, cache, error, []

    def __call__(self, repo_id, filename, *, repo_type=None, force_download=False, **_):
        self.calls.append((filename, force_download))
        assert repo_type == "dataset"
        if self.error:
            raise self.error
        source, cached = self.repo / filename, self.cache / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not found")
        if force_download or not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, cached)
        return str(cached)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    repo = tmp_path / "hub"
    shards = repo / "datasets" / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    for i, name in enumerate(["fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"]):
        build_shards.write_shard(shards / name, np.arange(100 + i) % 1024)
    (repo / "datasets" / "tokenizers").mkdir()
    for ext in ("model", "vocab"):
        (repo / "datasets" / "tokenizers" / f"fineweb_1024_bpe.{ext}").write_bytes(b"tokenizer " + ext.encode())
    manifest = {
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 2, "files_val": 1}}
        ],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (repo / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    fake = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(downloader, "ROOT", tmp_path / "data")
    monkeypatch.setattr(downloader, "hf_hub_download", fake)
    return fake


EXPECTED_LOCAL = [
    "manifest.json",
    "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
    "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
    "tokenizers/fineweb_1024_bpe.model",
    "tokenizers/fineweb_1024_bpe.vocab",
]


def test_download_places_files_and_second_run_makes_no_calls(hub, capsys):
    downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    for rel in EXPECTED_LOCAL:
        local = "manifests/willdepueoai/parameter-golf/manifest.json" if rel == "manifest.json" else rel  # per repo
        assert (downloader.ROOT / local).read_bytes() == (hub.repo / "datasets" / rel).read_bytes(), rel
    assert len(hub.calls) == len(EXPECTED_LOCAL)
    hub.calls.clear()
    downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    assert hub.calls == []
    assert capsys.readouterr().out.count("skipped ") == len(EXPECTED_LOCAL)


def test_positional_train_shard_count_fetches_a_prefix(hub):
    downloader.main(["--variant", "sp1024", "1"])
    assert (downloader.ROOT / EXPECTED_LOCAL[2]).is_file() and not (downloader.ROOT / EXPECTED_LOCAL[3]).exists()


def test_corrupt_present_shard_is_downloaded_again(hub, capsys):
    downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    local = downloader.ROOT / EXPECTED_LOCAL[1]
    local.write_bytes(local.read_bytes()[:-2])  # in place: a hard-linked hub cache blob is damaged with it
    hub.calls.clear()
    downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    assert hub.calls == [(f"datasets/{EXPECTED_LOCAL[1]}", True)]
    assert build_shards.shard_problem(local) is None
    assert "re-downloading" in capsys.readouterr().out


@pytest.mark.parametrize("error", [LocalEntryNotFoundError("offline"), OSError("Network is unreachable")])
def test_offline_exits_1_with_one_line(hub, capsys, error):
    hub.error = error
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", "sp1024"])
    err = one_line_error(capsys, excinfo, 1)
    assert "willdepueoai/parameter-golf" in err and "manifest.json" in err and "build_shards.py" in err


def test_file_missing_from_repo_exits_1_naming_it(hub, capsys):
    (hub.repo / "datasets" / EXPECTED_LOCAL[3]).unlink()
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", "sp1024", "--train-shards", "2"])
    assert "fineweb_train_000001.bin" in one_line_error(capsys, excinfo, 1)


def test_more_train_shards_than_published_exits_1(hub, capsys):
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", "sp1024", "--train-shards", "3"])
    assert "only 2" in one_line_error(capsys, excinfo, 1)


def test_skip_manifest_needs_a_local_one_and_then_never_fetches_it(hub, capsys):
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", "sp1024", "--skip-manifest"])
    assert "--skip-manifest" in one_line_error(capsys, excinfo, 1)
    downloader.main(["--variant", "sp1024", "0"])
    hub.calls.clear()
    downloader.main(["--variant", "sp1024", "--train-shards", "1", "--skip-manifest"])
    assert hub.calls == [(f"datasets/{EXPECTED_LOCAL[2]}", False)]


def test_with_docs_also_fetches_the_selected_docs(hub):
    for name in ("docs_selected.jsonl", "docs_selected.source_manifest.json"):
        (hub.repo / "datasets" / name).write_text("{}\n")
    downloader.main(["--variant", "sp1024", "0", "--with-docs"])
    assert (downloader.ROOT / "docs_selected.jsonl").is_file()
    assert (downloader.ROOT / "docs_selected.source_manifest.json").is_file()
