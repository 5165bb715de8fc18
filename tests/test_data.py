"""The DATA section: shards, the sequential and shuffled train loaders, the val split."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from build_shards import write_shard


def test_shard_write_read_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, 1000)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert tg.load_data_shard(tmp_path / "fineweb_train_000000.bin").numpy().tolist() == tokens.tolist()

def test_loader_gives_each_rank_a_disjoint_span_of_one_stream(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(50))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 100))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    seen = []
    loaders = [tg.DistributedTokenLoader(pattern, 100, r, 2) for r in range(2)]
    for _ in range(3):
        for loader in loaders:
            x, y = loader.next_batch(16, 4, 2)
            assert torch.equal(y[:, :-1], x[:, 1:])
            seen.append(x.flatten().tolist())
    # Call c gives rank r the span starting at 10c + 5r (4 inputs + 1 shifted target per span), across shards.
    assert seen == [list(range(10 * c + 5 * r, 10 * c + 5 * r + 4)) for c in range(3) for r in range(2)]


def test_shuffled_loader_deals_disjoint_sequences_covering_each_shard(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 103))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(1000, 1090))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    L, world, per_call = 4, 2, 3  # 3 sequences per rank per call

    def starts(seed, calls):
        loaders = [tg.ShuffledTokenLoader(pattern, 1100, r, world, seed) for r in range(world)]
        out = []
        for _ in range(calls):
            per_rank = []
            for loader in loaders:
                x, y = loader.next_batch(world * per_call * L, L, 1)
                assert x.shape == (per_call, L) and torch.equal(y[:, :-1], x[:, 1:])
                assert (x[:, 1:] - x[:, :-1] == 1).all() and (y[:, -1] - x[:, -1] == 1).all()  # contiguous spans
                per_rank.append(x[:, 0].tolist())
            assert not set(per_rank[0]) & set(per_rank[1])  # disjoint across ranks
            out += per_rank[0] + per_rank[1]
        return out

    # The first pass deals shard 0 whole, then shard 1 whole: every sequence at the shard's phase, each once.
    dealt = starts(seed=7, calls=10)
    split = next(i for i, s in enumerate(dealt) if s >= 1000)
    end = next(i for i in range(split, len(dealt)) if dealt[i] < 1000)
    for block, base, size in [(dealt[:split], 0, 103), (dealt[split:end], 1000, 90)]:
        phase = (min(block) - base) % L
        assert sorted(block) == [base + phase + L * j for j in range((size - phase - 1) // L)]
        assert block != sorted(block)  # shuffled
    assert starts(seed=7, calls=10) == dealt and starts(seed=8, calls=10) != dealt  # deterministic from SEED


def test_val_split_is_read_whole_and_short_splits_are_rejected(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(10, 13))
    assert tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin")).tolist() == list(range(13))
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN or EVAL_SEQ_LEN"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=16)


@pytest.mark.parametrize("name", ["sequential", "shuffled"])
def test_prefetched_batches_are_the_loaders_own_even_when_the_shape_changes(tmp_path, name):
    # The thread reads ahead for one batch shape; a new shape (GPTQ calibration, a test) rewinds to the next batch
    # not handed out, so the sequence is the plain loader's.
    for i in range(3):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [(11 * j + i) % 90 for j in range(500)])
    args = tg.Hyperparameters({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "90", "TRAIN_LOADER": name, "TRAIN_STREAM": "0"})
    shapes = [(128, 16, 1)] * 5 + [(64, 8, 2)] * 3 + [(128, 16, 1)] * 4
    plain = tg.TRAIN_LOADERS[name](args, 0, 1)
    ahead = tg.BatchPrefetcher(tg.TRAIN_LOADERS[name](args, 0, 1), torch.device("cpu"), 3)
    for shape in shapes:
        for a, b in zip(plain.next_batch(*shape), ahead.next_batch(*shape)):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    assert ahead.state_dict() == plain.state_dict()
    ahead.close()


def test_a_prefetch_thread_error_is_raised_in_the_training_thread(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10))  # no sequence of 16 + 1 tokens
    args = tg.Hyperparameters({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "90", "TRAIN_LOADER": "shuffled", "TRAIN_STREAM": "0"})
    ahead = tg.BatchPrefetcher(tg.TRAIN_LOADERS["shuffled"](args, 0, 1), torch.device("cpu"), 2)
    with pytest.raises(tg.ConfigError, match="no sequence of TRAIN_SEQ_LEN"):
        ahead.next_batch(64, 16, 1)
    assert ahead.thread is None


@pytest.mark.parametrize("loader", sorted(tg.TRAIN_LOADERS))
def test_a_train_shard_of_zero_tokens_is_refused_by_either_loader(tmp_path, loader):
    write_shard(tmp_path / "fineweb_train_000000.bin", [])
    args = tg.Hyperparameters({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "90", "TRAIN_LOADER": loader, "TRAIN_STREAM": "0"})
    with pytest.raises(tg.ConfigError, match="fineweb_train_000000.bin: a valid header but 0 tokens; remove it"):
        tg.TRAIN_LOADERS[loader](args, 0, 1).next_batch(64, 16, 1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_folder_named_like_a_shard_is_refused_in_one_line(tmp_path, split):
    write_shard(tmp_path / f"fineweb_{split}_000000.bin", np.arange(100))
    (tmp_path / f"fineweb_{split}_000001.bin").mkdir()
    args = tg.Hyperparameters({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "90"})
    with pytest.raises(tg.ConfigError, match=f"fineweb_{split}_000001.bin: not a file but matches the shard pattern"):
        tg.TRAIN_LOADERS["sequential"](args, 0, 1) if split == "train" else tg.load_validation_tokens(args.val_files)


def test_compare_refuses_a_folder_named_like_a_val_shard_in_one_line(tiny_data, tmp_path, capsys):
    import compare

    (tmp_path / "fineweb_val_000000.bin").mkdir()
    np.save(tmp_path / "a.npy", np.zeros(10, dtype=np.float32))
    assert compare.main([str(tmp_path / "a.npy"), "--data-path", str(tmp_path), "--tokenizer", str(tiny_data[1])]) == 2
    folder = tmp_path / "fineweb_val_000000.bin"
    assert capsys.readouterr().err == f"compare: error: {folder}: not a file but matches the shard pattern; rename " \
        "or move it out of DATA_PATH\n"


# SMOKE=1's auto-build: it writes only into its own cache; the user's DATA_PATH and TOKENIZER_PATH are never touched.
def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(root, train: bool):
    (root / "ds").mkdir()
    if train:
        write_shard(root / "ds" / "fineweb_train_000000.bin", np.arange(1000) % 90)
    write_shard(root / "ds" / "fineweb_val_000000.bin", np.arange(500) % 90)
    write_shard(root / "ds" / "fineweb_val_000001.bin", np.arange(300) % 90)
    (root / "tok.model").write_bytes(b"the user's tokenizer")


SMOKE_FOREIGN_CASES = {  # case: (the user's data has train shards, DATA_PATH, TOKENIZER_PATH, the error's start)
    "data_path_and_mistyped_tokenizer": (True, "ds", "tokk.model", "SMOKE=1: TOKENIZER_PATH={root}/tokk.model does "
                                         "not exist, and the smoke builds data only into its own cache, not "
                                         "DATA_PATH={root}/ds, TOKENIZER_PATH={root}/tokk.model: fix TOKENIZER_PATH"),
    "folder_of_val_shards_only": (False, "ds", "tok.model", "SMOKE=1: DATA_PATH={root}/ds has no train shards"),
    "mistyped_data_path": (True, "dss", "tok.model", "SMOKE=1: DATA_PATH={root}/dss has no train shards"),
    "data_path_without_tokenizer_path": (True, "ds", None, "SMOKE=1: TOKENIZER_PATH="),
}


@pytest.mark.parametrize("case", sorted(SMOKE_FOREIGN_CASES))
def test_smoke_never_builds_into_the_users_paths(tmp_path, monkeypatch, case):
    monkeypatch.setattr(tg, "SMOKE_CACHE", tmp_path / "cache", raising=False)  # the smoke's own tokenizer: missing
    train, data, tok, expected = SMOKE_FOREIGN_CASES[case]
    user_files(tmp_path, train)
    before = snapshot(tmp_path)
    env = {"SMOKE": "1", "DATA_PATH": str(tmp_path / data)} | ({"TOKENIZER_PATH": str(tmp_path / tok)} if tok else {})
    with pytest.raises(tg.ConfigError) as excinfo:
        tg.ensure_smoke_data(tg.Hyperparameters(env), True)
    assert str(excinfo.value).startswith(expected.format(root=tmp_path)) and "\n" not in str(excinfo.value)
    assert snapshot(tmp_path) == before


def test_smoke_cache_is_named_by_its_vocab_size_and_built_there_once(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "SMOKE_CACHE", tmp_path)
    builds = []
    monkeypatch.setattr(tg.subprocess, "run", lambda cmd: builds.append(cmd) or SimpleNamespace(returncode=0))
    args = tg.Hyperparameters({"SMOKE": "1", "VOCAB_SIZE": "512"})
    own = (str(tmp_path / "datasets/smoke_sp512"), str(tmp_path / "tokenizers/smoke_512_bpe.model"))
    assert (args.data_path, args.tokenizer_path) == own
    assert tg.Hyperparameters({"SMOKE": "1"}).data_path == str(tmp_path / "datasets/smoke_sp1024")
    tg.ensure_smoke_data(args, True)
    assert builds == [[sys.executable, str(tg.SCRIPT_DIR / "data/build_shards.py"), "--embedded", "--out-dir", own[0],
                       "--train-tokenizer", own[1], "--vocab-size", "512", "--overwrite"]]
    user_files(tmp_path, train=True)
    for made, path in zip((tmp_path / "ds", tmp_path / "tok.model"), own):
        Path(path).parent.mkdir()
        made.rename(path)
    tg.ensure_smoke_data(args, True)  # found: nothing built
    assert len(builds) == 1


# The manifest ties the shards to their tokenizer: another one of the same vocabulary size is refused.
@pytest.fixture(scope="module")
def other_tokenizer(tiny_data, tmp_path_factory):
    """A tokenizer of tiny_data's vocabulary size (384), trained on other documents."""
    import pydoc_data.topics
    from build_shards import train_sentencepiece

    path = tmp_path_factory.mktemp("other") / "other.model"
    train_sentencepiece(list(pydoc_data.topics.topics.values()), path, 384, 10**6, 1, lambda *a: None)
    return path


def test_a_tokenizer_other_than_the_manifests_is_refused(tiny_data, other_tokenizer, tmp_path):
    import compare

    data_path, tok = tiny_data
    assert tg.check_tokenizer_sha256(str(data_path), str(tok), False).startswith("tokenizer_check:ok sha256:")
    with pytest.raises(tg.ConfigError) as excinfo:  # train_gpt.py's load_val_data (below: it logs the override)
        tg.check_tokenizer_sha256(str(data_path), str(other_tokenizer), False)
    err = str(excinfo.value)
    assert err.startswith(f"{other_tokenizer} (sha256 ") and f"not the tokenizer the shards in {data_path} were " \
        "built with" in err and err.endswith("or set ALLOW_OTHER_TOKENIZER=1 to score with this one")
    with pytest.raises(compare.CompareError, match="or set --allow-other-tokenizer to score with this one"):
        sp = spm.SentencePieceProcessor(model_file=str(other_tokenizer))
        compare.load_val_and_bytes(compare.val_pattern(str(data_path)), sp, str(other_tokenizer))


def test_the_tokenizer_override_is_logged_and_data_without_a_manifest_is_not_checked(tiny_data, other_tokenizer,
                                                                                     tmp_path):
    from conftest import data_env, run_train

    # RESUME of a missing checkpoint stops the run right after the val data is read and checked
    env = data_env(tiny_data, TOKENIZER_PATH=str(other_tokenizer), ALLOW_OTHER_TOKENIZER="1", RUN_ID="other",
                   RESUME=str(tmp_path / "none.pt"))
    assert run_train(tmp_path, env, check=False).returncode == 2
    log = (tmp_path / "logs" / "other.txt").read_text()
    assert re.search(r"^warning:tokenizer_check:overridden by ALLOW_OTHER_TOKENIZER=1: \S+other.model \(sha256 ", log,
                     re.M)
    (tmp_path / "ds").mkdir()
    for shard in tiny_data[0].glob("fineweb_*.bin"):
        (tmp_path / "ds" / shard.name).write_bytes(shard.read_bytes())
    assert tg.check_tokenizer_sha256(str(tmp_path / "ds"), str(other_tokenizer), False) == \
        f"tokenizer_check:none (no manifest.json in {tmp_path / 'ds'})"
