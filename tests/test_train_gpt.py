"""train_gpt.py on CPU: import, model, Muon, data errors, byte accounting, export, end-to-end runs."""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from build_shards import write_shard
from conftest import ROOT, TINY_ENV, data_env, run_train

TINY = {"BASELINE": "1", "VOCAB_SIZE": "64", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"}


def tiny_args(**env):
    return tg.Hyperparameters({**TINY, **env})


def train_losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]


# -----------------------------
# Import, settings
# -----------------------------

def test_import_has_no_side_effects(tmp_path):
    code = "import train_gpt, torch.distributed as d; assert not d.is_initialized()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_misspelt_env_var_is_reported_with_the_intended_name():
    args = tg.Hyperparameters({})
    warnings = args.misspellings({"NUM_LAYER": "3", "MATRIX_LRR": "0.1", "PATH": "/bin", "NUM_LAYERS": "9"})
    assert any("NUM_LAYER " in w and "NUM_LAYERS" in w for w in warnings)
    assert any("MATRIX_LRR" in w and "MATRIX_LR" in w for w in warnings)
    assert len(warnings) == 2


def test_smoke_preset_yields_to_explicit_env():
    args = tg.Hyperparameters({"SMOKE": "1", "ITERATIONS": "7"})
    assert args.iterations == 7 and args.model_dim == int(tg.SMOKE_PRESET["MODEL_DIM"])
    assert tg.Hyperparameters({}).model_dim == 512


def test_baseline_preset_restores_the_starter_under_smoke_and_explicit_env():
    stack, starter = tg.Hyperparameters({}).settings, tg.Hyperparameters({"BASELINE": "1"}).settings
    assert all(stack[k] != starter[k] for k in tg.BASELINE_PRESET)  # no dead entries
    assert (starter["NUM_LAYERS"], starter["MLP_MULT"], starter["MLP_ACT"], starter["QUANT"]) == (9, 2, "relu2", "int8")
    args = tg.Hyperparameters({"SMOKE": "1", "BASELINE": "1", "MLP_ACT": "swiglu"})
    assert args.num_layers == int(tg.SMOKE_PRESET["NUM_LAYERS"]) and args.ttt_enabled  # the smoke scale wins
    assert args.mlp_act == "swiglu" and args.bigram_buckets == 0 and args.mlp_mult == 2  # explicit, then starter


@pytest.mark.parametrize("env,needle", [
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS"), ({"MODEL": "rnn"}, "MODEL"), ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS"),
    ({"QUANT": "int3"}, "QUANT"), ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
])
def test_bad_settings_raise_config_errors_naming_the_variable(env, needle):
    with pytest.raises(tg.ConfigError, match=needle):
        tg.Hyperparameters(env)


def test_readme_documents_every_env_var():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.M))
    settings = set(tg.Hyperparameters({}).settings)
    assert settings - documented == set(), "settings missing from README"
    assert documented - settings == set(), "README lists env vars the script does not read"


# -----------------------------
# Model and optimizer
# -----------------------------

def test_gpt_forward_backward_shapes_and_gradients():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, torch.roll(x, -1, 1))
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    # Zero-initialized output projections: the first step's gradient reaches them, and the loss is uniform-ish.
    assert abs(loss.mean().item() - math.log(64)) < 0.5
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for block in model.blocks:
        assert block.attn.proj.weight.grad.abs().sum() > 0 and block.mlp.proj.weight.grad.abs().sum() > 0


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), torch.device("cpu"))
    for p in model.parameters():  # leave zero init so that every path contributes
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.randint(0, 64, (1, 16))
    y = torch.randint(0, 64, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 64
    a, b = model(x, y), model(x2, y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6) and not torch.allclose(a[0, 10:], b[0, 10:])


def test_isolated_documents_never_see_each_other():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), torch.device("cpu"))
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.randint(2, 64, (1, 16))
    x[0, 6] = tg.BOS_ID
    x2 = x.clone()
    x2[0, :6] = torch.randint(2, 64, (6,))  # change only the first document
    y = torch.randint(0, 64, (1, 16))
    a, b = model(x, y, isolate_docs=True), model(x2, y, isolate_docs=True)
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-6) and not torch.allclose(a[0, :6], b[0, :6])
    assert not torch.allclose(model(x, y)[0, 6:], model(x2, y)[0, 6:])  # without isolation it does leak
    # With no BOS inside the window, isolation changes nothing.
    z = torch.randint(2, 64, (2, 16))
    assert torch.allclose(model(z, y.expand(2, -1), isolate_docs=True), model(z, y.expand(2, -1)), atol=1e-6)


def test_param_groups_cover_every_parameter_once():
    model = tg.build_model(tiny_args(TIE_EMBEDDINGS="0"), torch.device("cpu"))
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in groups["matrix"]) and groups["head"]


def test_newton_schulz_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        X = tg.zeropower_via_newtonschulz5(torch.randn(shape), steps=5)
        s = torch.linalg.svdvals(X)
        # The quintic's fixed point is a band around 1, not exactly 1 (modded-nanogpt).
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())


def test_muon_step_moves_along_orthogonalized_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    before = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.0, backend_steps=5)
    p.grad = torch.randn(32, 16)
    opt.step()
    update = (before - p.detach()) / 0.1 / math.sqrt(32 / 16)
    expected = tg.zeropower_via_newtonschulz5(p.grad, 5)
    assert torch.allclose(update, expected, atol=1e-5)


def test_lr_multiplier_warmdown_by_steps_and_by_time():
    args = tiny_args(ITERATIONS="100", WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="0")
    assert tg.lr_multiplier(args, 10, 0) == 1.0 and tg.lr_multiplier(args, 90, 0) == pytest.approx(0.5)
    args = tiny_args(WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="12", GPTQ="1", GPTQ_RESERVE_SECONDS="2")
    # 100 ms per step so far: 20 warmdown steps are the last 2 s of the 10 s budget (12 s less the GPTQ reserve).
    assert tg.lr_multiplier(args, 50, 5000) == 1.0
    assert tg.lr_multiplier(args, 90, 9000) == pytest.approx(0.5)


# -----------------------------
# Data
# -----------------------------

def test_shard_write_read_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, 1000)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert tg.load_data_shard(tmp_path / "fineweb_train_000000.bin").numpy().tolist() == tokens.tolist()


def test_loader_gives_each_rank_a_disjoint_span_of_one_stream(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(50))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 100))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    seen = []
    loaders = [tg.DistributedTokenLoader(pattern, 100, r, 2, torch.device("cpu")) for r in range(2)]
    for _ in range(3):
        for loader in loaders:
            x, y = loader.next_batch(16, 4, 2)
            assert torch.equal(y[:, :-1], x[:, 1:])
            seen.append(x.flatten().tolist())
    # Call c gives rank r the span starting at 10c + 5r (4 inputs + 1 shifted target per span), across shards.
    assert seen == [list(range(10 * c + 5 * r, 10 * c + 5 * r + 4)) for c in range(3) for r in range(2)]


def test_val_split_is_read_whole_and_short_splits_are_rejected(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(10, 13))
    assert tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin")).tolist() == list(range(13))
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_LEN"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=16)


def _bad_inputs(tmp_path, tiny_data):
    data_path, tok = tiny_data
    bad = tmp_path / "bad"
    bad.mkdir()
    good_val = next(data_path.glob("fineweb_val_*.bin")).read_bytes()
    good_train = next(data_path.glob("fineweb_train_*.bin")).read_bytes()

    def dataset(name, train=good_train, val=good_val):
        d = bad / name
        d.mkdir()
        (d / "fineweb_train_000000.bin").write_bytes(train)
        (d / "fineweb_val_000000.bin").write_bytes(val)
        return str(d)

    magic = bytearray(good_train)
    magic[0] ^= 0xFF
    big = np.array([1, 2, 500], dtype="<u2").tobytes()
    big_val = bytearray(good_val[:1024]) + good_val[1024:1030] + big
    big_val[8:12] = ((len(big_val) - 1024) // 2).to_bytes(4, "little")
    short = bytearray(good_val[:1024 + 20])
    short[8:12] = (10).to_bytes(4, "little")
    return {
        "no shards": ({"DATA_PATH": str(bad / "nowhere")}, "cached_challenge_fineweb.py"),
        "missing tokenizer": ({"TOKENIZER_PATH": str(bad / "nope.model")}, "TOKENIZER_PATH"),
        "bad header": ({"DATA_PATH": dataset("magic", train=bytes(magic))}, "not a challenge shard"),
        "truncated": ({"DATA_PATH": dataset("trunc", train=good_train[:-7])}, "truncated"),
        "token id": ({"DATA_PATH": dataset("big", val=bytes(big_val))}, "VOCAB_SIZE=384"),
        "vocab mismatch": ({"VOCAB_SIZE": "512"}, "VOCAB_SIZE=512"),
        "short val": ({"DATA_PATH": dataset("short", val=bytes(short))}, "TRAIN_SEQ_LEN"),
    }


def test_each_bad_input_gets_a_one_line_error(tmp_path, tiny_data, monkeypatch):
    # In process (a subprocess per case costs seconds of imports): main() must raise a ConfigError, whose
    # one-line message the __main__ handler prints as `error: ...` with exit 2 (the subprocess test below).
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE", "BASELINE"):
        monkeypatch.delenv(name, raising=False)
    for case, (env, needle) in _bad_inputs(tmp_path, tiny_data).items():
        with monkeypatch.context() as m:
            for name, value in {**TINY_ENV, **data_env(tiny_data, RUN_ID="bad", **env)}.items():
                m.setenv(name, value)
            with pytest.raises(tg.ConfigError) as e:
                tg.main()
        assert "\n" not in str(e.value) and needle in str(e.value), (case, str(e.value))


def test_no_data_without_smoke_names_download_and_smoke(tmp_path):
    proc = run_train(tmp_path, {"DATA_PATH": str(tmp_path / "none")}, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), proc.stderr[-2000:]
    assert "cached_challenge_fineweb.py" in err[0] and "SMOKE=1" in err[0]


# -----------------------------
# Scoring
# -----------------------------

def test_byte_luts_match_decoded_utf8_bytes(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data[1]))
    luts = tg.build_sentencepiece_luts(sp, 384, torch.device("cpu"))
    docs = ["Hello world, this is a test.", "  leading spaces and   runs", "naïve café — ünïcödé 東京 🙂",
            "digits 12345 and 3.14159", "\u2581literal marker"]
    assert any(sp.is_byte(i) for d in docs for i in sp.encode(d))  # byte fallback is exercised
    stream = [tg.BOS_ID]
    for d in docs:
        stream += sp.encode(d) + [tg.BOS_ID]
    ids = torch.tensor(stream)
    counted = tg.count_target_bytes(ids[:-1], ids[1:], luts).sum().item()
    assert counted == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)


def test_eval_windows_score_every_target_once():
    for n, L, stride in [(100, 16, 16), (101, 16, 16), (100, 16, 5), (17, 16, 4), (16, 16, 16), (1000, 64, 64)]:
        counts = np.zeros(n, dtype=int)
        for start, first in tg.eval_windows(n, L, stride):
            assert 0 <= start <= n - L and 0 <= first < L
            counts[start + first : start + L] += 1
            assert first == 0 or first >= L - stride or start == n - L  # context as specified
        assert (counts == 1).all(), (n, L, stride)


# Quantization and export are tested in tests/test_quant.py.


# -----------------------------
# End to end
# -----------------------------

LOG_LINES = [
    r"^run_id:tiny$", r"^setting:SEED=1$", r"^setting:TIE_EMBEDDINGS=1$", r"^env:SEED=1$", r"^code_sha256:[0-9a-f]{64} code_bytes:\d+ code_path:\S+$",
    r"^versions python:\S+ torch:\S+ numpy:\S+ sentencepiece:\S+$", r"^hardware:1x.+ world_size:1 grad_accum_steps:8$",
    r"^source_begin$", r"^source_end$", r"^model_params:\d+$",
    r"^step:1/30 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    r"^step:30/30 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    r"^train_done steps:30 train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    r"^final_prequant_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
    r"^Total submission size int6\+\w+: \d+ bytes$",
    r"^artifact:\S+ format:int6_\w+ model_bytes:\d+ code_bytes:\d+ total_bytes:\d+ cap:16000000 under_cap:1$",
    r"^final_int6_\w+_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$",
    r"^token_losses:\S+ count:\d+$",
    r"^submission score:int6_\w+_roundtrip val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} total_bytes:\d+ under_cap:1 "
    r"train_time:\d+ms eval_time:\d+ms$",
]


def test_log_follows_the_contract(tiny_run):
    cwd, log, _ = tiny_run
    for pattern in LOG_LINES:
        assert re.search(pattern, log, re.M), pattern
    assert re.match(r"final_int6_\w+_roundtrip_exact val_loss:", log.rstrip("\n").splitlines()[-1])
    source = log.split("source_begin\n", 1)[1].split("\nsource_end\n", 1)[0] + "\n"
    assert source == (ROOT / "train_gpt.py").read_text()


def test_tiny_run_learns_and_roundtrip_stays_close(tiny_run):
    _, log, _ = tiny_run
    losses = train_losses(log)
    assert len(losses) == 30 and np.mean(losses[-5:]) < losses[0] - 1.0
    pre = float(re.search(r"^final_prequant_exact val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    post = float(re.search(r"^final_int6_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    assert abs(post - pre) < 0.02


def test_token_losses_reproduce_val_bpb_from_decoded_text(tiny_run, tiny_data):
    _, log, loss_path = tiny_run
    losses = np.load(loss_path)
    val = tg.load_validation_tokens(str(tiny_data[0] / "fineweb_val_*.bin")).numpy()
    assert losses.dtype == np.float32 and losses.shape == (len(val) - 1,) and (losses > 0).all()
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data[1]))
    docs = np.split(val, np.flatnonzero(val == tg.BOS_ID))
    n_bytes = sum(len(sp.decode(d[d != tg.BOS_ID].tolist()).encode("utf-8")) for d in docs)
    m = re.search(r"^final_int6_\w+_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", log, re.M)
    assert losses.astype(np.float64).mean() == pytest.approx(float(m.group(1)), abs=1e-7)
    assert losses.astype(np.float64).sum() / math.log(2) / n_bytes == pytest.approx(float(m.group(2)), abs=1e-7)


def test_artifact_alone_rebuilds_the_scored_model(tiny_run, tiny_data):
    cwd, log, loss_path = tiny_run
    blob = (cwd / "final_model.int6.ptz").read_bytes()
    assert f"model_bytes:{len(blob)} " in log
    model, args = tg.model_from_artifact(blob, torch.device("cpu"))
    assert args.num_layers == 2 and args.model_dim == 64
    val = tg.load_validation_tokens(str(tiny_data[0] / "fineweb_val_*.bin")).long()
    x, y = val[:64][None], val[1:65][None]
    assert torch.allclose(model(x, y)[0], torch.from_numpy(np.load(loss_path)[:64]), atol=1e-5)


def test_validation_during_training_leaves_training_intact(tiny_data, tmp_path):
    run_train(tmp_path, data_env(tiny_data, RUN_ID="val", SEED="1", ITERATIONS="4", VAL_LOSS_EVERY="2"))
    log = (tmp_path / "logs" / "val.txt").read_text()
    assert len(re.findall(r"^step:[024]/4 val_loss:", log, re.M)) == 3


def test_same_seed_same_losses_and_warmup_is_fully_undone(tiny_run, tiny_data, tmp_path):
    _, log, _ = tiny_run
    run_train(tmp_path, data_env(tiny_data, RUN_ID="again", SEED="1", WARMUP_STEPS="3", TOKEN_LOSS_PATH=""))
    log2 = (tmp_path / "logs" / "again.txt").read_text()
    assert "warmup_step:3/3" in log2
    assert train_losses(log2) == train_losses(log)
    other = run_train(tmp_path, data_env(tiny_data, RUN_ID="other", SEED="2", ITERATIONS="3"))
    assert other.returncode == 0 and train_losses((tmp_path / "logs" / "other.txt").read_text()) != train_losses(log)[:3]


# torchrun with 2 processes against 1: tests/test_optim.py (with batched Muon and the other optimizer options).


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_bf16_forward_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), torch.device("cuda"))
    x = torch.randint(0, 64, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, x)
        compiled = torch.compile(model, dynamic=False, fullgraph=True)(x, x)
    assert (compiled - eager).abs().max() < 2e-2
