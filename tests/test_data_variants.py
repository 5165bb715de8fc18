"""The 8192-piece data variants (issue 13): CaseOps shards with a val byte sidecar, the manifest beside the
shards, train_gpt.py's refusal of a leaky val split and its sidecar byte counting, the downloader's repos and
file names. CPU and offline; the record's CaseOps scripts serve as oracles where ../shared/reference exists.

Usage: python3 -m pytest -q tests/test_data_variants.py
"""

import hashlib
import importlib.util
import json
import math
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from conftest import require_reference, run_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_shards  # noqa: E402
import cached_challenge_fineweb as downloader  # noqa: E402
import train_gpt as tg  # noqa: E402

PR1855 = ROOT.parent / "shared" / "reference" / "pr1855"
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
quiet = lambda *a, **k: None  # noqa: E731


def reference_caps():
    """The record's lossless_caps.py (MIT), as an oracle; skips where the reference is absent."""
    require_reference(PR1855 / "lossless_caps.py")
    # Loaded by path: PR1855 on sys.path would shadow our train_gpt.py in every later import (spawned ranks too).
    spec = importlib.util.spec_from_file_location("pr1855_lossless_caps", PR1855 / "lossless_caps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


WORDS = "the of and to in is was for that with as on by at from his her they we you it this be are have had".split()
SHAPES = [str.lower, str.title, str.upper, lambda w: w[:1] + w[1:].upper(), lambda w: w]
EXTRAS = ["iPhone", "OpenAI", "NASA", "A", "I", "McDonald", "cafe\u0301", "caf\u00e9", "na\u00efve", "x2", "--", "(ok)"]


def cased_docs(n: int, seed: int = 0) -> list[str]:
    """Sentences with every CaseOps case: lower, Title, ALLCAPS, mixed, single capitals, non-ASCII letters."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(SHAPES)(rng.choice(WORDS)) if rng.random() < 0.85 else rng.choice(EXTRAS)
                 for _ in range(rng.randint(20, 60))]
        docs.append(" ".join(words) + ".")
    return docs


# -----------------------------
# CASEOPS TRANSFORM AND BYTE COUNTS
# -----------------------------


def test_caseops_encode_spells_each_case_as_its_markers():
    title, allcaps, capnext, esc = build_shards.CASEOPS_MARKERS
    assert build_shards.caseops_encode("iPhone OpenAI NASA A the") == (
        f"i{capnext}phone {title}open{capnext}a{capnext}i {allcaps}nasa {title}a the")
    assert build_shards.caseops_encode(f"x{title}y\u00c9") == f"x{esc}{title}y\u00c9"  # markers escaped, non-ASCII kept


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ Qq .,\u00e9\u2014\U0001F600\u3000\ufb01\u01c5\n\t\ue000\ue001\ue002\ue003\ue004") + EXTRAS
    texts = ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).strip() for _ in range(n))
    return [t for t in texts if t]


def test_caseops_encode_equals_the_records_transform():
    caps = reference_caps()
    texts = random_texts(3000, seed=1) + cased_docs(50)
    assert [build_shards.caseops_encode(t) for t in texts] == [caps.encode_lossless_caps_v2(t) for t in texts]


@pytest.fixture(scope="module")
def caseops_sp():
    path = PR1855 / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    if not path.is_file():
        pytest.skip("the record's CaseOps tokenizer is not here")
    return spm.SentencePieceProcessor(model_file=str(path))


def test_token_bytes_are_the_records_sidecar_and_sum_to_the_original_text(caseops_sp):
    caps = reference_caps()
    for text in random_texts(2000, seed=2) + cased_docs(50, seed=2):
        ids, counts = build_shards.caseops_tokens_and_bytes(caseops_sp, text)
        encoded = caps.encode_lossless_caps_v2(text)
        assert ids == caseops_sp.encode(encoded)
        # the record's exporter counts each token's surface (its span of the encoded text) with this function
        spans = caseops_sp.encode_as_offset_mapping(encoded)["offsets"]
        expected = caps.surface_piece_original_byte_counts([encoded[a:b] for a, b in spans],
                                                           text_transform_name=caps.LOSSLESS_CAPS_CASEOPS_V1)
        assert counts.tolist() == expected, text
        assert counts.sum() == len(text.encode())


# -----------------------------
# CASEOPS BUILD AND MANIFEST
# -----------------------------

NUM_DOCS, VAL_DOCS, VOCAB = 120, 12, 320


def read_tokens(path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=build_shards.HEADER_BYTES)


def build_caseops(docs, out: Path, tokenizer: Path, **kw) -> dict:
    return build_shards.build(docs, out, tokenizer, val_docs=kw.pop("val_docs", VAL_DOCS), caseops=True,
                              shard_tokens=kw.pop("shard_tokens", 700), workers=1, log=quiet, **kw)


@pytest.fixture(scope="module")
def caseops_build(tmp_path_factory):
    """A CaseOps dataset in a folder named like the challenge's, with a CaseOps tokenizer trained on it."""
    root = tmp_path_factory.mktemp("caseops")
    docs = cased_docs(NUM_DOCS)
    docs.insert(VAL_DOCS + 5, docs[3])  # a train copy of a val document: the build must drop it
    out, tok = root / "mine", root / "caseops.model"
    summary = build_shards.build(docs, out, tok, vocab_size=VOCAB, train_tokenizer=True, val_docs=VAL_DOCS,
                                 caseops=True, shard_tokens=700, workers=1, log=quiet)
    return {"root": root, "docs": docs, "out": out, "tok": tok, "summary": summary,
            "sp": spm.SentencePieceProcessor(model_file=str(tok))}


def nfkc(text: str) -> str:
    """What decoding gives back: the tokenizers normalize with nmt_nfkc ("cafe\u0301" -> "caf\u00e9")."""
    return unicodedata.normalize("NFKC", text)


def split_files(out: Path, prefix: str) -> list[Path]:
    return sorted(p for p in out.glob(f"fineweb_{prefix}_*.bin") if prefix != "val" or "_bytes_" not in p.name)


def test_caseops_tokenizer_holds_one_piece_per_marker(caseops_build):
    sp = caseops_build["sp"]
    assert all(sp.piece_to_id(m) != sp.unk_id() for m in build_shards.CASEOPS_MARKERS)


def test_caseops_shards_spell_the_encoded_docs_and_the_sidecar_the_original_bytes(caseops_build):
    b, out = caseops_build, caseops_build["out"]
    val, sidecar = split_files(out, "val"), split_files(out, "val_bytes")
    assert len(val) > 1 and [p.name.replace("val_bytes", "val") for p in sidecar] == [p.name for p in val]
    assert all(build_shards.shard_problem(p) is None for p in sidecar)
    tokens, counts = (np.concatenate([read_tokens(p) for p in files]) for files in (val, sidecar))
    assert tokens.shape == counts.shape and not counts[tokens == build_shards.BOS_ID].any()
    starts = np.flatnonzero(tokens == build_shards.BOS_ID).tolist() + [tokens.size]
    docs = b["docs"][:VAL_DOCS]
    assert len(starts) - 1 == VAL_DOCS
    for doc, a, z in zip(docs, starts, starts[1:]):
        assert b["sp"].decode(tokens[a + 1 : z].tolist()) == nfkc(build_shards.caseops_encode(doc))
        assert int(counts[a:z].sum()) == len(doc.encode())  # "cafe\u0301" too: bytes of the text before NFKC
    assert not list(out.glob("fineweb_train_bytes_*"))  # only val is scored


def test_manifest_records_variant_tokenizer_and_split(caseops_build):
    b = caseops_build
    m = json.loads((b["out"] / "manifest.json").read_text())
    train = split_files(b["out"], "train")
    assert m["variant"] == "mine" and m["caseops"] is True and m["challenge_docs"] is False
    assert m["tokenizer_sha256"] == hashlib.sha256(b["tok"].read_bytes()).hexdigest()
    assert (m["val_docs"], m["train_docs"], m["train_docs_dropped_as_val_copies"]) == (VAL_DOCS, NUM_DOCS - VAL_DOCS, 1)
    assert m["val_tokens"] == sum(read_tokens(p).size for p in split_files(b["out"], "val"))
    assert m["train_shards"] == len(train) > 1 and m["val_bytes_shards"] == m["val_shards"]
    assert m["shuffle_seed"] is None


def test_train_docs_never_repeat_a_val_doc(caseops_build):
    b = caseops_build
    tokens = np.concatenate([read_tokens(p) for p in split_files(b["out"], "train")])
    train_docs = [b["sp"].decode(part[1:].tolist()) for part in np.split(tokens, np.flatnonzero(tokens == 1))[1:]]
    expected = [nfkc(build_shards.caseops_encode(d)) for i, d in enumerate(b["docs"]) if i >= VAL_DOCS and i != VAL_DOCS + 5]
    assert train_docs == expected
    assert not {nfkc(build_shards.caseops_encode(d)) for d in b["docs"][:VAL_DOCS]} & set(train_docs)


def test_caseops_parallel_encoding_matches_single_process(caseops_build, tmp_path, monkeypatch):
    monkeypatch.setattr(build_shards, "ENCODE_BATCH_DOCS", 8)  # several val and train batches: the pool really runs
    b = caseops_build
    outputs = []
    for workers in (1, 2):
        summary = build_shards.build(b["docs"], tmp_path / f"w{workers}", b["tok"], val_docs=VAL_DOCS, caseops=True,
                                     shard_tokens=700, workers=workers, log=quiet)
        outputs.append([Path(f).read_bytes() for f in summary["files"]])
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(list((tmp_path / "w1").glob("fineweb_*.bin")))


def test_caseops_with_a_plain_tokenizer_exits_2(tmp_path, capsys):
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in cased_docs(30)))
    build_shards.main(["--docs", str(docs), "--out-dir", str(tmp_path / "plain"), "--val-docs", "3", "--workers", "1",
                       "--train-tokenizer", str(tmp_path / "plain.model"), "--vocab-size", str(VOCAB)])
    with pytest.raises(SystemExit) as excinfo:
        build_shards.main(["--docs", str(docs), "--out-dir", str(tmp_path / "o"), "--val-docs", "3", "--caseops",
                           "--tokenizer", str(tmp_path / "plain.model"), "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert excinfo.value.code == 2 and len(err.splitlines()) == 1 and "CaseOps markers" in err


# -----------------------------
# TRAIN_GPT: SIDECAR BYTES
# -----------------------------


def caseops_args(data_path: Path, tok: Path, **env) -> tg.Hyperparameters:
    return tg.Hyperparameters({"DATA_PATH": str(data_path), "TOKENIZER_PATH": str(tok), "VOCAB_SIZE": str(VOCAB),
                               "TRAIN_SEQ_LEN": "64", "VAL_BATCH_SIZE": "4096", "COMPILE": "0", **env})


class ConstantLoss(torch.nn.Module):
    def forward(self, x, y):
        return torch.ones(x.shape)


def scored_bytes(args, luts, val_tokens, **kw) -> float:
    """Bytes evaluate() divided by, from its bpb on a model whose loss is 1 nat per target."""
    _, val_bpb, _ = tg.evaluate(args, ConstantLoss(), val_tokens, luts, 0, 1, torch.device("cpu"), **kw)
    return (val_tokens.numel() - 1) / (val_bpb * math.log(2))


def test_val_glob_skips_the_sidecar_and_scoring_counts_the_original_bytes(caseops_build):
    b = caseops_build
    args = caseops_args(b["out"], b["tok"])
    val_tokens = tg.load_validation_tokens(args.val_files, args.vocab_size)
    assert val_tokens.numel() == json.loads((b["out"] / "manifest.json").read_text())["val_tokens"]
    luts = tg.val_byte_counter(args, b["sp"], val_tokens.numel(), torch.device("cpu"))
    assert isinstance(luts, torch.Tensor)
    original = sum(len(d.encode()) for d in b["docs"][:VAL_DOCS])
    for stride in (64, 16):  # whole windows, and sliding windows that score each target once
        assert scored_bytes(args, luts, val_tokens, stride=stride) == pytest.approx(original, rel=1e-12)
    # control: the tokenizer's tables count the encoded text (markers as 3 bytes each), not the original
    tables = tg.build_sentencepiece_luts(b["sp"], VOCAB, torch.device("cpu"))
    assert scored_bytes(args, tables, val_tokens) > original * 1.05


def test_compare_reads_the_val_tokens_and_the_sidecar_bytes_as_the_scorer_does(caseops_build):
    import compare

    b = caseops_build
    args = caseops_args(b["out"], b["tok"])
    pattern = compare.val_pattern(str(b["out"]))
    tokens, nbytes = compare.load_val_and_bytes(pattern, b["sp"], str(b["tok"]))
    assert tokens.tolist() == tg.load_validation_tokens(args.val_files).tolist()  # no sidecar shard among them
    assert int(nbytes.sum()) == sum(len(d.encode()) for d in b["docs"][:VAL_DOCS])  # the original text's bytes


def test_add_scores_takes_each_scored_targets_sidecar_bytes():
    sidecar = torch.arange(100, dtype=torch.int32) % 7
    idx = torch.tensor([[3, 4, 5, 6], [40, 41, 42, 43]])
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    totals = torch.zeros(2, dtype=torch.float64)
    tg.add_scores(torch.ones(2, 4), mask, None, None, idx, sidecar, totals, None)
    assert totals.tolist() == [6.0, float(sidecar[idx[mask] + 1].sum())] and totals[1] == 5 + 6 + 6 + 0 + 1 + 2


def test_caseops_tokenizer_without_sidecar_is_refused(caseops_build, tmp_path):
    b = caseops_build
    copy = tmp_path / "copy"
    shutil.copytree(b["out"], copy)
    for p in copy.glob("fineweb_val_bytes_*.bin"):
        p.unlink()
    args = caseops_args(copy, b["tok"])
    with pytest.raises(tg.ConfigError, match="no val byte sidecar") as excinfo:
        tg.val_byte_counter(args, b["sp"], 10, torch.device("cpu"))
    assert "\n" not in str(excinfo.value)


def test_sidecar_of_other_shards_is_refused(caseops_build):
    b = caseops_build
    args = caseops_args(b["out"], b["tok"])
    with pytest.raises(tg.ConfigError, match="belongs to other shards"):
        tg.val_byte_counter(args, b["sp"], 12345, torch.device("cpu"))


# -----------------------------
# TRAIN_GPT: REFUSING A LEAKY VAL SPLIT
# -----------------------------


@pytest.fixture(scope="module")
def leaky_caseops(caseops_build):
    """A CaseOps build named as the challenge's dataset, with too few val docs (like prep's --val-docs=10000)."""
    b = caseops_build
    out = b["root"] / CASEOPS_DATASET
    build_caseops(b["docs"][:NUM_DOCS], out, b["tok"], val_docs=10)
    return out


def test_leaky_challenge_build_is_refused_by_its_manifest(leaky_caseops):
    tokens = json.loads((leaky_caseops / "manifest.json").read_text())["val_tokens"]
    with pytest.raises(tg.ConfigError, match=r"10 documents .*50000.*#2127") as excinfo:
        tg.check_val_split(str(leaky_caseops), tokens)
    assert "\n" not in str(excinfo.value)


def test_leaky_build_without_manifest_is_refused_by_its_val_token_count(leaky_caseops, tmp_path):
    prep_like = tmp_path / CASEOPS_DATASET  # the record's prep script writes no manifest
    shutil.copytree(leaky_caseops, prep_like)
    (prep_like / "manifest.json").unlink()
    with pytest.raises(tg.ConfigError, match=r"47851521-47853568.*#2127"):
        tg.check_val_split(str(prep_like), json.loads((leaky_caseops / "manifest.json").read_text())["val_tokens"])


@pytest.mark.parametrize("name, count, ok", [
    ("fineweb10B_sp8192", 40_541_000, True), ("fineweb10B_sp8192", 8_108_000, False),
    (CASEOPS_DATASET, 47_853_344, True), (CASEOPS_DATASET, 47_853_344 - 2048, False),
    ("fineweb10B_sp1024", 62_021_640, True), ("fineweb10B_sp1024", 12_400_000, False), ("blogs_sp8192", 5, True)])
def test_published_datasets_val_token_counts(tmp_path, name, count, ok):
    (tmp_path / name).mkdir()
    if ok:
        tg.check_val_split(str(tmp_path / name), count)
    else:
        with pytest.raises(tg.ConfigError, match="first 50000 documents"):
            tg.check_val_split(str(tmp_path / name), count)


def test_custom_corpus_keeps_its_own_split(caseops_build):
    b = caseops_build
    tg.check_val_split(str(b["out"]), b["summary"]["val_tokens"])  # "mine", 12 val docs: not a challenge variant


def test_manifest_that_disagrees_with_the_shards_is_refused(caseops_build):
    b = caseops_build
    with pytest.raises(tg.ConfigError, match="changed since the build"):
        tg.check_val_split(str(b["out"]), b["summary"]["val_tokens"] + 1)


@pytest.mark.parametrize("text", ["{", '{"variant": "x"}', "[]"])
def test_unreadable_or_incomplete_manifest_is_refused(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(tg.ConfigError, match="unreadable or incomplete"):
        tg.check_val_split(str(tmp_path), 100)


@pytest.fixture(scope="module")
def challenge_docs(tmp_path_factory):
    """50,040 short documents in a file named like the challenge's docs_selected.jsonl, and a tokenizer."""
    root = tmp_path_factory.mktemp("challenge")
    rng = random.Random(5)
    lines = (json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n" for _ in range(50_040))
    (root / "docs_selected.jsonl").write_text("".join(lines))
    build_shards.train_sentencepiece(cased_docs(40), root / "t.model", VOCAB, 10**6, 1, quiet)
    return root


@pytest.mark.parametrize("extra, refused", [([], False), (["--shuffle-seed", "1"], True)])
def test_build_from_the_challenge_docs_needs_their_first_50000_as_val(challenge_docs, tmp_path, extra, refused):
    out = tmp_path / "fineweb10B_custom"  # not a published name: the docs file marks it a challenge build
    summary = build_shards.main(["--docs", str(challenge_docs / "docs_selected.jsonl"), "--val-docs", "50000",
                                 "--tokenizer", str(challenge_docs / "t.model"), "--out-dir", str(out),
                                 "--workers", "1", *extra])
    assert json.loads((out / "manifest.json").read_text())["challenge_docs"] is True
    if refused:
        with pytest.raises(tg.ConfigError, match="shuffle seed 1"):
            tg.check_val_split(str(out), summary["val_tokens"])
    else:
        tg.check_val_split(str(out), summary["val_tokens"])


@pytest.mark.slow  # a whole run: keeps the README command under 5 minutes on 2 cores
def test_train_gpt_refuses_a_leaky_caseops_build_and_scores_a_clean_one_by_its_sidecar(
        caseops_build, leaky_caseops, tmp_path):
    b = caseops_build
    env = {"DATA_PATH": str(leaky_caseops), "TOKENIZER_PATH": str(b["tok"]), "VOCAB_SIZE": str(VOCAB)}
    proc = run_train(tmp_path, env, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("error: ") and "50000" in err[-1], proc.stderr[-2000:]
    proc = run_train(tmp_path, {**env, "DATA_PATH": str(b["out"]), "ITERATIONS": "4", "RUN_ID": "caseops"})
    log = (tmp_path / "logs" / "caseops.txt").read_text()
    assert "val_bytes:sidecar" in log and "final_" in log


# -----------------------------
# DOWNLOADER
# -----------------------------


class FakeHub:
    """hf_hub_download over local folders, one per repo id; records (repo_id, filename) per call."""

    def __init__(self, repos: Path, error: Exception | None = None):
        self.repos, self.error, self.calls = repos, error, []

    def __call__(self, repo_id, filename, *, repo_type=None, force_download=False, **_):
        self.calls.append((repo_id, filename))
        assert repo_type == "dataset"
        if self.error:
            raise self.error
        source = self.repos / repo_id / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not found")
        return str(source)


def publish(repos: Path, repo_id: str, dataset: str, tokenizer: str, *, train: int, sidecar_listed: bool,
            docs_val: int | None = 50_000) -> None:
    """A dataset repo laid out as the challenge's: datasets/manifest.json, datasets/datasets/<dataset>/..."""
    base = repos / repo_id / "datasets"
    shards = base / "datasets" / dataset
    shards.mkdir(parents=True)
    names = ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(train)]
    for i, name in enumerate(names):
        build_shards.write_shard(shards / name, np.arange(50 + i) % 256)
    (base / "tokenizers").mkdir()
    (base / "tokenizers" / tokenizer).write_bytes(b"model")
    stats = {"files_train": train, "files_val": 1, **({"docs_val": docs_val} if docs_val else {})}
    entry = {"name": dataset, "tokenizer_name": "tok", "stats": stats}
    if sidecar_listed:
        entry["val_bytes_glob"] = f"datasets/{dataset}/fineweb_val_bytes_*.bin"
    manifest = {"datasets": [entry], "tokenizers": [{"name": "tok", "model_path": f"tokenizers/{tokenizer}"}]}
    (base / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    repos = tmp_path / "repos"
    publish(repos, "kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe.model", train=3,
            sidecar_listed=False, docs_val=None)
    publish(repos, "romeerp/parameter-golf-caseops-v1", CASEOPS_DATASET,
            "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", train=2, sidecar_listed=False)
    publish(repos, "someone/leaky", CASEOPS_DATASET, "t.model", train=2, sidecar_listed=True, docs_val=10_000)
    fake = FakeHub(repos)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.setattr(downloader, "ROOT", tmp_path / "data")
    monkeypatch.setattr(downloader, "hf_hub_download", fake)
    return fake


def test_sp8192_comes_from_kevclark_with_the_1_0810_records_names(hub):
    downloader.main(["--variant", "sp8192", "--train-shards", "2"])
    remote = "datasets/datasets/fineweb10B_sp8192/"
    assert hub.calls == [("kevclark/parameter-golf", f) for f in [
        "datasets/manifest.json", remote + "fineweb_val_000000.bin", remote + "fineweb_train_000000.bin",
        remote + "fineweb_train_000001.bin", "datasets/tokenizers/fineweb_8192_bpe.model"]]
    data = downloader.ROOT
    assert (data / "manifests/kevclark/parameter-golf/manifest.json").is_file()
    assert (data / "tokenizers/fineweb_8192_bpe.model").read_bytes() == b"model"
    assert sorted(p.name for p in (data / "datasets/fineweb10B_sp8192").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]


@pytest.mark.parametrize("variant", ["sp8192_caseops", "sp8192_lossless_caps_caseops_v1_reserved"])
def test_caseops_comes_from_romeerp_with_its_val_byte_sidecar(hub, variant):
    downloader.main(["--variant", variant, "--train-shards", "2"])
    assert {repo for repo, _ in hub.calls} == {"romeerp/parameter-golf-caseops-v1"}
    local = downloader.ROOT / "datasets" / CASEOPS_DATASET
    assert sorted(p.name for p in local.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert (downloader.ROOT / "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").is_file()
    # the data as train_gpt.py reads it: tokens from the val glob, bytes from the sidecar
    assert [Path(p).name for p in tg.shard_files(str(local / "fineweb_val_[0-9]*.bin"), "val")] == ["fineweb_val_000000.bin"]


def test_repo_id_flag_and_env_override_the_variants_repo(hub, monkeypatch, tmp_path):
    publish(hub.repos, "me/mirror", "fineweb10B_sp8192", "fineweb_8192_bpe.model", train=1, sidecar_listed=False)
    downloader.main(["--variant", "sp8192", "1", "--repo-id", "me/mirror"])
    assert {repo for repo, _ in hub.calls} == {"me/mirror"}
    hub.calls.clear()
    monkeypatch.setattr(downloader, "ROOT", tmp_path / "data2")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "me/mirror")
    downloader.main(["--variant", "sp8192", "1"])
    assert {repo for repo, _ in hub.calls} == {"me/mirror"}


def test_each_repo_keeps_its_own_manifest(hub):
    downloader.main(["--variant", "sp8192", "0"])
    downloader.main(["--variant", "sp8192_caseops", "0"])
    hub.calls.clear()
    downloader.main(["--variant", "sp8192_caseops", "1", "--skip-manifest"])  # reads romeerp's, not kevclark's
    assert hub.calls == [("romeerp/parameter-golf-caseops-v1",
                          f"datasets/datasets/{CASEOPS_DATASET}/fineweb_train_000000.bin")]


def test_a_repo_whose_val_split_is_not_50000_docs_is_refused(hub, capsys):
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", "sp8192_caseops", "1", "--repo-id", "someone/leaky"])
    err = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1 and len(err.splitlines()) == 1 and "10000 documents" in err


@pytest.mark.parametrize("variant, expected", [
    ("sp8192", ["https://huggingface.co/datasets/kevclark/parameter-golf", "datasets/manifest.json",
                "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
                "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin..fineweb_train_000079.bin",
                "datasets/tokenizers/fineweb_8192_bpe.model"]),
    ("sp8192_caseops", ["https://huggingface.co/datasets/romeerp/parameter-golf-caseops-v1",
                        f"datasets/datasets/{CASEOPS_DATASET}/fineweb_val_000000.bin",
                        f"datasets/datasets/{CASEOPS_DATASET}/fineweb_val_bytes_000000.bin",
                        f"datasets/datasets/{CASEOPS_DATASET}/fineweb_train_000000.bin..fineweb_train_000079.bin",
                        "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"]),
])
@pytest.mark.parametrize("error", [LocalEntryNotFoundError("offline"), OSError("Network is unreachable")])
def test_offline_says_in_one_line_what_it_would_fetch_and_from_where(hub, capsys, variant, expected, error):
    hub.error = error
    with pytest.raises(SystemExit) as excinfo:
        downloader.main(["--variant", variant, "--train-shards", "80"])
    err = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1 and len(err.splitlines()) == 1
    assert all(part in err for part in expected + [str(downloader.ROOT), "build_shards.py"]), err
