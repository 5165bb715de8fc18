"""Evaluation paths on CPU: sliding-window coverage, score-first TTT and per-document LoRA TTT legality,
rank splits, the time budget, and one end-to-end run that reports every path."""

import copy
import math
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

import bench
import train_gpt as tg
from build_shards import write_shard
from conftest import CPU, data_env, run_train

# Tiny model and eval settings: 8 windows per batch, 4 TTT training sequences per chunk, 4 LoRA slots.
EVAL_ENV = {  # on the 1.1194-era stack, whose LoRA defaults these tests were written for
    "STACK": "1.1194", "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32", "VAL_BATCH_SIZE": "2048", "COMPILE": "0", "EVAL_STRIDE": "8",
    "TTT_CHUNK_TOKENS": "128", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_PARAMS": "*",
    "LORA_CHUNK_TOKENS": "8", "LORA_SLOTS": "4", "LORA_LR": "0.05", "LORA_TARGETS": "*.c_q,*.c_v,*.mlp.proj",
}


def eval_args(**env):
    return tg.Hyperparameters({**EVAL_ENV, **{k: str(v) for k, v in env.items()}})


def tiny_model(args, seed=0):
    # Random weights everywhere (the zero-initialized projections would make context irrelevant).
    torch.manual_seed(seed)
    model = tg.build_model(args, CPU)
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    return model


def doc_stream(n, vocab, seed=0):
    """n tokens: documents of 10..89 tokens, each starting with BOS."""
    return bench.random_documents(n, vocab, torch.Generator().manual_seed(seed), (10, 90))


def fake_luts(vocab):
    # One byte per target, none for BOS: enough to check that every target's bytes are counted once.
    base = torch.ones(vocab, dtype=torch.int16)
    base[tg.BOS_ID] = 0
    return base, torch.zeros(vocab, dtype=torch.bool), torch.arange(vocab) == tg.BOS_ID


def on_cpu(name):
    # An EVAL_PATHS entry's function with this file's defaults: rank 0 of 1, on the CPU.
    run = tg.EVAL_PATHS[name].run
    return lambda a, m, t, l, r=0, w=1, **kw: run(a, m, t, l, r, w, CPU, **kw)


PATHS = {"sliding": on_cpu("sliding_window"), "ttt": on_cpu("ttt"), "lora": on_cpu("lora_ttt")}


def run_path(path, args, model, tokens, fill=0.0, **kw):
    """Per-target losses of one path, and its (val_loss, val_bpb, stats)."""
    losses = torch.full((tokens.numel() - 1,), fill)
    result = PATHS[path](args, model, tokens, fake_luts(args.vocab_size), losses=losses, **kw)
    return losses, result


# -----------------------------
# Byte accounting
# -----------------------------

def test_byte_luts_match_decoded_utf8_bytes(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data[1]))
    luts = tg.build_sentencepiece_luts(sp, 384, CPU)
    docs = ["Hello world, this is a test.", "  leading spaces and   runs", "naïve café — ünïcödé 東京 🙂",
            "digits 12345 and 3.14159", "\u2581literal marker"]
    assert any(sp.is_byte(i) for d in docs for i in sp.encode(d))  # byte fallback is exercised
    stream = [tg.BOS_ID]
    for d in docs:
        stream += sp.encode(d) + [tg.BOS_ID]
    ids = torch.tensor(stream)
    counted = tg.count_target_bytes(ids[:-1], ids[1:], luts).sum().item()
    assert counted == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)


# -----------------------------
# Sliding windows
# -----------------------------

@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 16), (101, 16, 5), (103, 16, 7), (16, 16, 4), (17, 16, 16),
                                              (1000, 64, 64), (999, 64, 1), (1001, 64, 48)])
def test_windows_score_every_target_once_with_the_specified_context(n, seq_len, stride):
    context = np.full(n, -1)
    windows = tg.eval_windows(n, seq_len, stride)
    for start, first in windows:
        assert 0 <= start <= n - seq_len and 0 <= first < seq_len
        assert (context[start + first : start + seq_len] == -1).all(), "a target scored twice"
        context[start + first : start + seq_len] = np.arange(first, seq_len)
    t = np.arange(n)
    assert (context >= 0).all(), "a target never scored"
    assert (context[:seq_len] == t[:seq_len]).all()  # the first window scores all its targets
    assert (context >= np.minimum(t, seq_len - stride)).all() and (context < seq_len).all()
    assert windows[-1][0] == n - seq_len  # the tail is scored by a window aligned to the end


def test_sliding_scores_are_each_targets_own_window_and_totals_are_exact():
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(501, 64)
    losses, (val_loss, val_bpb, stats) = run_path("sliding", args, model, tokens)
    windows = tg.eval_windows(500, 32, 8)
    assert stats["windows"] == len(windows) and (losses > 0).all()
    with torch.no_grad():
        for start, first in windows[::5] + windows[-1:]:
            ref = model(tokens[None, start : start + 32], tokens[None, start + 1 : start + 33])[0]
            assert torch.allclose(losses[start + first : start + 32], ref[first:], atol=1e-5)
    n_bytes = tg.count_target_bytes(tokens[:-1], tokens[1:], fake_luts(64)).sum().item()
    assert val_loss == pytest.approx(losses.double().mean().item(), rel=1e-9)
    assert val_bpb == pytest.approx(losses.double().sum().item() / math.log(2) / n_bytes, rel=1e-9)


def test_stride_equal_to_seq_len_is_the_plain_evaluation():
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(333, 64)
    plain = torch.zeros(332)
    vl, vb, _ = tg.evaluate(args, model, tokens, fake_luts(64), 0, 1, CPU, losses=plain)
    same, (vl2, vb2, _) = run_path("sliding", eval_args(EVAL_STRIDE=32), model, tokens)
    assert torch.equal(plain, same) and (vl, vb) == (vl2, vb2)
    slid, (vl3, _, _) = run_path("sliding", args, model, tokens)
    assert torch.equal(slid[:32], plain[:32]) and vl3 != vl


def test_ranks_split_the_windows_and_add_up_to_the_exact_totals():
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(400, 64)
    full, (val_loss, _, _) = run_path("sliding", args, model, tokens)
    # Without a process group each rank returns its share of the sums; together they are the whole.
    parts = [run_path("sliding", args, model, tokens, r=r, w=3) for r in range(3)]
    assert torch.allclose(sum(p[0] for p in parts), full, atol=1e-6)
    assert sum(p[1][0] for p in parts) == pytest.approx(val_loss, rel=1e-6)


def test_isolated_documents_never_see_the_previous_document():
    args = eval_args(DOC_ATTENTION=1)
    model, tokens = tiny_model(args), doc_stream(400, 64)
    bos = (tokens == tg.BOS_ID).nonzero().flatten().tolist()
    changed = tokens.clone()
    changed[bos[2] - 5 : bos[2]] = torch.randint(2, 64, (5,))  # the end of document 1 only
    a, _ = run_path("sliding", args, model, tokens)
    b, _ = run_path("sliding", args, model, changed)
    assert torch.equal(a[bos[2] :], b[bos[2] :]) and not torch.equal(a[: bos[2]], b[: bos[2]])


def test_ntk_rope_scaling_keeps_the_highest_frequency_and_slows_the_lowest():
    rotary = tg.Rotary(8, 10000.0, train_seq_len=32)

    def freqs(seq_len):  # each pair's angle step per position
        cos, sin = rotary(seq_len, CPU, torch.float32)
        return torch.atan2(sin[0, 0, 1], cos[0, 0, 1])

    assert torch.allclose(freqs(32), rotary.inv_freq) and torch.allclose(freqs(16), rotary.inv_freq)  # trained lengths
    longer = freqs(128)  # 4x the trained context
    assert longer[0] == pytest.approx(rotary.inv_freq[0].item()) and longer[-1] == pytest.approx(rotary.inv_freq[-1].item() / 4)
    assert (longer <= rotary.inv_freq + 1e-7).all()
    two = tg.Rotary(2, 10000.0, train_seq_len=32)  # one frequency, the highest: kept (it was 0/0: NaN)
    unscaled = tg.Rotary(2, 10000.0, train_seq_len=128)
    assert torch.equal(torch.cat(two(128, CPU, torch.float32)), torch.cat(unscaled(128, CPU, torch.float32)))


def test_model_still_trains_after_an_evaluation():
    # Scoring must leave nothing behind (no inference-mode tensor, no eval mode) that breaks the next training step.
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(200, 64)
    tg.evaluate(args, model, tokens, fake_luts(64), 0, 1, CPU)
    assert model.training and torch.is_grad_enabled()
    model(tokens[None, :32], tokens[None, 1:33]).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_eval_settings_resolve_and_unmatched_patterns_name_the_variable():
    assert tg.Hyperparameters({"TRAIN_SEQ_LEN": "128"}).eval_seq_len == 128
    assert tg.Hyperparameters({"TRAIN_SEQ_LEN": "128"}).settings["EVAL_SEQ_LEN"] == 128
    assert tg.Hyperparameters({"TRAIN_SEQ_LEN": "32", **EVAL_ENV}).settings["EVAL_STRIDE"] == 8
    beyond = {"TRAIN_SEQ_LEN": "32", "EVAL_STRIDE": "64", "STACK": "1.1194"}  # a stride beyond the window: plain
    assert tg.Hyperparameters(beyond).settings["EVAL_STRIDE"] == 32
    args = eval_args(TTT_PARAMS="nothing.*", LORA_TARGETS="*.nothing")
    for path, needle in [("ttt", "TTT_PARAMS"), ("lora", "LORA_TARGETS")]:
        with pytest.raises(tg.ConfigError, match=needle):
            run_path(path, args, tiny_model(args), doc_stream(300, 64))


# -----------------------------
# Legality
# -----------------------------

@pytest.mark.parametrize("path,env", [("sliding", {}), ("ttt", {}), ("lora", {}), ("lora", {"LORA_WARM_A": 1}),
                                      ("ttt", {"DOC_ATTENTION": 0})])
def test_changing_later_tokens_never_changes_earlier_scores(path, env):
    args = eval_args(**env)
    model, tokens = tiny_model(args), doc_stream(701, 64)
    state = copy.deepcopy(model.state_dict())
    base, _ = run_path(path, args, model, tokens)
    for p in (100, 128, 333, 600):  # inside chunks and on a chunk boundary
        changed = tokens.clone()
        changed[p + 1 :] = doc_stream(700 - p, 64, seed=p)  # new text and new document boundaries
        losses, _ = run_path(path, args, model, changed)
        # Target t predicts token t+1 from tokens <= t: targets < p read only tokens <= p.
        assert torch.allclose(base[:p], losses[:p], atol=1e-6, rtol=0), (path, p)
        assert not torch.allclose(base[p:], losses[p:])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "adaptation changed the model"


@pytest.mark.parametrize("path", ["ttt", "lora"])
def test_adaptation_changes_scores_only_after_the_first_chunk(path):
    # The test above is not vacuous: adapting does move the scores, and only those after training began.
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(701, 64)
    slid, _ = run_path("sliding", args, model, tokens)
    adapted, _ = run_path(path, args, model, tokens)
    if path == "ttt":
        assert torch.allclose(slid[:128], adapted[:128], atol=1e-6) and not torch.allclose(slid[128:], adapted[128:])
        assert adapted[128:].mean() < slid[128:].mean()
    else:
        assert not torch.allclose(slid, adapted)


@pytest.mark.parametrize("path", ["ttt", "lora"])
def test_no_optimizer_step_sees_an_unscored_token(path):
    # Token i carries id i + 2 (BOS aside), so a batch tells which stream positions it holds.
    n = 600
    args = eval_args(VOCAB_SIZE=n + 2)
    tokens = torch.where(doc_stream(n, 64) == tg.BOS_ID, tg.BOS_ID, torch.arange(n) + 2)
    model = tiny_model(args)
    trained, steps = [], []
    scored = torch.full((n - 1,), float("nan"))

    def record(module, inputs):
        if torch.is_grad_enabled():
            y = inputs[1]
            trained.append(y[y >= 2] - 3)  # target index of each real token in the batch

    def check(optimizer, *_):
        batch = torch.cat(trained)
        assert not torch.isnan(scored[batch]).any(), "an optimizer step uses a target not yet scored"
        steps.append(int(batch.max()))
        trained.clear()

    model.register_forward_pre_hook(record)
    handle = register_optimizer_step_pre_hook(check)
    try:
        PATHS[path](args, model, tokens, fake_luts(n + 2), losses=scored)
    finally:
        handle.remove()
    assert steps and not torch.isnan(scored).any()
    if path == "ttt":  # the last chunk (targets 512..598) is never trained on
        assert max(steps) < 512 and steps == sorted(steps)


def test_lora_adapters_are_reset_for_each_document():
    # A document scores the same inside the stream as alone: nothing carries over from the documents before it.
    args = eval_args(LORA_SLOTS=2)
    model, tokens = tiny_model(args), doc_stream(401, 64)
    full, _ = run_path("lora", args, model, tokens)
    warm, _ = run_path("lora", eval_args(LORA_SLOTS=2, LORA_WARM_A=1), model, tokens)
    bounds = (tokens[:400] == tg.BOS_ID).nonzero().flatten().tolist() + [400]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        alone, _ = run_path("lora", args, model, tokens[a : b + 1])
        assert torch.allclose(full[a:b], alone, atol=1e-6), i
        if i >= 2 and b - a > 8:  # warm A: a slot's second document starts from what the first taught it
            assert not torch.allclose(warm[a:b], alone, atol=1e-6), i


@pytest.mark.parametrize("path", ["ttt", "lora"])
def test_time_budget_stops_adaptation_and_scoring_goes_on(path):
    args = eval_args(EVAL_MAX_SECONDS=0)
    model, tokens = tiny_model(args), doc_stream(701, 64)
    losses, (_, _, stats) = run_path(path, args, model, tokens)
    assert stats["adapted"].startswith("0") and (losses > 0).all()
    if path == "ttt":  # no update ever happened: exactly the sliding-window scores
        assert torch.allclose(losses, run_path("sliding", args, model, tokens)[0], atol=1e-6)


@pytest.mark.parametrize("path", ["ttt", "lora"])
def test_compile_warm_up_uses_random_tokens_and_changes_nothing(path, monkeypatch):
    # torch.compile stubbed out: the COMPILE=1 code path (warm-up included) must score exactly like COMPILE=0.
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(401, 64)
    plain, _ = run_path(path, args, model, tokens)
    seen = []
    model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    compiled, (_, _, stats) = run_path(path, eval_args(COMPILE=1), model, tokens)
    assert torch.equal(plain, compiled) and stats["compile"] > 0
    windows = {tuple(row.tolist()) for x in seen[2:] for row in x}  # the two warm-up calls come first
    assert not any(tuple(row.tolist()) in windows for x in seen[:2] for row in x), "warm-up read val windows"


def _two_rank_worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(701, 64)
    results = {path: run_path(path, args, model, tokens, r=rank, w=2) for path in PATHS}
    if rank == 0:
        torch.save({p: (r[0], r[1][:2]) for p, r in results.items()}, out)
    dist.destroy_process_group()


def test_two_ranks_match_one_for_every_path(tmp_path):
    # Windows, chunks and documents split over ranks; TTT gradients averaged: the same scores as one process.
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2,
                       start_method="spawn")
    two = torch.load(tmp_path / "out.pt")
    args = eval_args()
    model, tokens = tiny_model(args), doc_stream(701, 64)
    for path in PATHS:
        losses, (val_loss, val_bpb, _) = run_path(path, args, model, tokens)
        assert torch.allclose(two[path][0], losses, atol=1e-4), path
        assert two[path][1] == pytest.approx((val_loss, val_bpb), rel=1e-5), path


# -----------------------------
# End to end
# -----------------------------

@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_every_path_reports_and_the_best_one_is_the_submission(tiny_data, tmp_path):
    # The tiny dataset with its val split cut to 12k tokens keeps every path to a few seconds.
    data_path, tok = tiny_data
    short = tmp_path / "short"
    short.mkdir()
    for f in data_path.glob("fineweb_train_*.bin"):
        (short / f.name).write_bytes(f.read_bytes())
    write_shard(short / "fineweb_val_000000.bin", tg.load_validation_tokens(str(data_path / "fineweb_val_*.bin"))[:12000].numpy())
    env = data_env((short, tok), RUN_ID="paths", SEED="1", EVAL_SEQ_LEN="128", EVAL_STRIDE="64", TTT_ENABLED="1",
                   TTT_CHUNK_TOKENS="1024", TTT_LR="0.01", LORA_TTT_ENABLED="1", LORA_CHUNK_TOKENS="64",
                   LORA_SLOTS="8", TOKEN_LOSS_PATH=str(tmp_path / "losses.npy"))
    run_train(tmp_path, env)
    log = (tmp_path / "logs" / "paths.txt").read_text()
    assert re.search(r"^eval_rope:ntk factor:2\.0000$", log, re.M)
    declared = re.findall(r"^eval_path:(\w+) adapts:([01]) rule:(\w+)$", log, re.M)
    assert declared == [("roundtrip", "0", "none"), ("sliding_window", "0", "none"), ("ttt", "1", "score_first"),
                        ("lora_ttt", "1", "score_first")]
    bpb = {}
    roundtrip = re.search(r"^final_(\w+_roundtrip)_exact ", log, re.M).group(1)
    for what in (roundtrip, "sliding_window", "ttt", "lora_ttt"):
        m = re.search(rf"^final_{what}_exact val_loss:(\d+\.\d{{8}}) val_bpb:(\d+\.\d{{8}})$", log, re.M)
        assert m, what
        bpb[what] = (float(m.group(2)), float(m.group(1)))
        assert re.search(rf"^eval_phase:{what} time:\d+ms world_size:1 projected_8gpu:\d+ms", log, re.M), what
    best = min(bpb, key=lambda w: bpb[w][0])
    assert re.search(rf"^submission score:{best} val_loss:\S+ val_bpb:{bpb[best][0]:.8f} ", log, re.M)
    assert log.rstrip("\n").splitlines()[-1].startswith(f"final_{best}_exact val_loss:")
    losses = np.load(tmp_path / "losses.npy")
    assert losses.shape == (11999,) and losses.astype(np.float64).mean() == pytest.approx(bpb[best][1], abs=1e-7)
