"""records/bench.py, the prepared GPU check, run on the CPU at a tiny shape (its figures mean nothing here)."""

import bench
import pytest
import torch

import train_gpt as tg
from conftest import TINY_MODEL


def test_random_documents_start_with_bos_every_64_to_1024_tokens():
    tokens = bench.random_documents(20_000, 50, torch.Generator().manual_seed(0))
    starts = (tokens == tg.BOS_ID).nonzero().flatten().tolist()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and len(starts) > 15 and min(gaps) >= 64 and max(gaps) <= 1024
    assert int(tokens.min()) >= 1 and int(tokens.max()) < 50


@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_bench_times_steps_and_every_enabled_eval_path_and_prints_the_table(capsys):
    env = {**TINY_MODEL, "BASELINE": "0", "MODEL_DIM": "64", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024",
           "ROPE_DIMS": "8", "XSA_LAST_N": "1", "BIGRAM_BUCKETS": "16", "PARALLEL_RESID_FROM": "1", "EVAL_STRIDE": "32",
           "VAL_BATCH_SIZE": "4096", "PHASED_TTT_ENABLED": "0"}
    row = bench.bench("default", env, steps=2, warmup=0, val_tokens=2048, device=torch.device("cpu"))
    assert row["ms_step"] > 0 and row["compile_s"] > 0 and row["kernel"] == "sdpa_masked"
    assert row["tokens_s"] == 1024 / (row["ms_step"] / 1000) and row["mfu"] > 0
    assert sorted(row["evals"]) == ["roundtrip", "sliding_window"] and all(v > 0 for v in row["evals"].values())
    text = bench.table([row], "CPU")
    assert "| config | ms/step | tokens/s | MFU | peak MiB | compile s | attention | roundtrip s (8 GPUs) | " \
           "sliding_window s (8 GPUs) |" in text
    assert text.splitlines()[-1].startswith("| default | ")
