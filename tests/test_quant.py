"""Quantization and export on CPU: QAT under torch.compile, GPTQ, mixed precision, compressors, packed code,
the cap remedy, calibration data, and scoring an artifact alone."""

import json
import os
import re
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT, TINY_ENV, data_env, exact_line

# Every block matrix above QUANT_FLOAT_MAX (STACK=1.1194: 4,096), so each one is quantized.
# The 1.1194-era stack's quantization (int8 embeddings, SDClip 12.85, no low-rank): the constants these tests were
# written for; tests/test_recipe_quant.py covers the recipe's.
SMALL = {"VOCAB_SIZE": "256", "NUM_LAYERS": "2", "MODEL_DIM": "96", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "STACK": "1.1194"}


def small_model(**env):
    torch.manual_seed(0)
    args = tg.Hyperparameters({**SMALL, **env})
    model = tg.build_model(args, torch.device("cpu"))
    for p in model.parameters():  # off the zero init, so that every matrix matters
        p.data.add_(0.05 * torch.randn_like(p))
    tg.configure_qat(model, args)
    return model, args


def test_a_compressor_whose_module_is_missing_is_refused_with_its_install_command(monkeypatch):
    assert tg.Hyperparameters({"COMPRESSOR": "brotli"}).compressor == "brotli"  # a requirement: installed
    monkeypatch.setitem(sys.modules, "brotli", None)  # as on a machine without it: import fails
    assert "brotli" not in tg.available_compressors()
    with pytest.raises(tg.ConfigError, match="pip install brotli"):
        tg.Hyperparameters({"COMPRESSOR": "brotli"})
    blob = tg.ARTIFACT_MAGIC + bytes([6]) + b"brotli" + b"payload"
    with pytest.raises(tg.ConfigError, match="pip install brotli"):
        tg.unpack_artifact(blob, "model.pgolf")


# -----------------------------
# QAT
# -----------------------------

def test_ste_passes_the_gradient_of_the_quantized_forward():
    layer = tg.CastedLinear(64, 32, bias=False)
    layer.qat = partial(tg.fake_quantize, qmax=31, k=12.85)
    tg.set_qat(layer, True)
    x = torch.randn(8, 64)
    layer(x).square().sum().backward()
    wq = tg.fake_quantize(layer.weight.detach(), 31, 12.85).requires_grad_()
    F.linear(x, wq).square().sum().backward()
    assert not torch.equal(wq, layer.weight) and torch.allclose(layer.weight.grad, wq.grad, atol=1e-5)


def test_qat_switch_is_a_buffer_that_the_compiled_model_reads():
    model, _ = small_model(NUM_LAYERS="1")
    linears = [m for m in model.modules() if isinstance(m, tg.CastedLinear) and m.qat is not None]
    assert linears and all("qat_on" in dict(m.named_buffers()) for m in linears)
    assert "qat_on" not in "".join(model.state_dict())  # not saved: artifacts and warm-up restores ignore it
    x = torch.randint(0, 256, (2, 32))
    # aot_eager: dynamo's tracing (where a Python flag would be frozen) without inductor's CPU compile time
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    off = compiled(x, x)
    assert torch.equal(off, model(x, x))
    tg.set_qat(model, True)
    on = compiled(x, x)
    assert not torch.allclose(on, off, atol=1e-4) and torch.allclose(on, model(x, x), atol=1e-5)
    tg.set_qat(model, False)
    assert torch.equal(compiled(x, x), off)


# -----------------------------
# GPTQ, classes, low rank
# -----------------------------

def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4096, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(4096, 128)  # strongly correlated inputs
    qmax, scale = 15, tg.sdclip_scales(w, 15, 6.0)
    rtn = (w / scale[:, None]).round().clamp(-qmax, qmax)
    gptq = tg.gptq(w, scale, qmax, x.T @ x, damp=0.01, block=32)
    assert gptq.abs().max() <= qmax and torch.equal(gptq, gptq.round())

    def err(q):
        return (x @ (w - q * scale[:, None]).T).square().mean().item()

    assert err(gptq) < 0.5 * err(rtn), (err(gptq), err(rtn))


def test_hessians_cover_every_matrix_and_the_tied_head():
    model, _ = small_model()
    x = torch.randint(0, 256, (2, 32))
    seen = []
    model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].reshape(-1, inp[0].size(-1))))
    hessians = tg.collect_hessians(model, [(x, x), (x.flip(1), x)])
    # The BigramHash table is a lookup with no input activations: it is rounded to nearest, like any matrix
    # without a Hessian; the tied embedding gets the output head's.
    matrices = {n for n, p in model.named_parameters()
                if p.ndim == 2 and not any(pat in n for pat in tg.CONTROL_TENSOR_NAME_PATTERNS)}
    matrices.discard("bigram.weight")
    assert matrices <= set(hessians) and "tok_emb.weight" in hessians and hessians["tok_emb.weight"].shape == (96, 96)
    hs = {n for n in hessians if not n.endswith(":rows")}
    assert all(any(pat in n for pat in tg.CONTROL_TENSOR_NAME_PATTERNS) for n in hs - matrices)  # gates
    assert {f"{n}:rows" for n in hs} == set(hessians) - hs  # and each one's row count (AWQ-lite)
    inputs = torch.cat(seen)
    assert torch.allclose(hessians["blocks.1.mlp.proj.weight"], inputs.T @ inputs, rtol=1e-4, atol=1e-4)
    assert hessians["blocks.1.mlp.proj.weight:rows"] == inputs.size(0)


def test_each_tensor_class_gets_its_own_precision():
    model, args = small_model(QUANT_ATTN="int5", QUANT_MLP="int7", QUANT_EMBED="fp16")
    sd = model.state_dict()
    qsd = tg.quantize_state_dict(sd, args)
    for name, qmax in (("blocks.0.attn.c_q.weight", 15), ("blocks.1.mlp.fc.weight", 63)):
        # SDClip: the grid step is k row standard deviations over qmax
        assert torch.equal(qsd[name]["scale"], (12.85 * sd[name].std(dim=1) / qmax).half())
        assert qsd[name]["q"].abs().max() <= qmax
    assert qsd["tok_emb.weight"]["w"].dtype == torch.float16
    assert qsd["blocks.0.attn_scale"]["w"].dtype == torch.float32  # control tensors stay fp32
    assert tg.tensor_class("blocks.0.mlp.fc.weight", torch.zeros(128, 64), args.quant_float_max) == "mlp"
    assert tg.tensor_class("blocks.0.mlp.fc.weight", torch.zeros(64, 64), args.quant_float_max) is None  # tiny: float


def test_low_rank_correction_shrinks_the_largest_errors():
    model, args = small_model(QUANT="int5", QUANT_EMBED="int5")
    sd = model.state_dict()
    plain = tg.dequantize_state_dict(tg.quantize_state_dict(sd, args))
    lowrank = tg.quantize_state_dict(sd, tg.Hyperparameters({**SMALL, "QUANT": "int5", "QUANT_EMBED": "int5",
                                                             "LOWRANK_RANK": "4", "LOWRANK_TENSORS": "2"}))
    corrected = [n for n, e in lowrank.items() if "lr_a" in e]
    assert len(corrected) == 2
    back = tg.dequantize_state_dict(lowrank)
    for n in corrected:
        assert (back[n] - sd[n]).norm() < (plain[n] - sd[n]).norm()


# -----------------------------
# Artifact, compressors, packed code
# -----------------------------

def _qsd():
    model, args = small_model(LOWRANK_RANK="2", LOWRANK_TENSORS="1")
    qsd = tg.quantize_state_dict(model.state_dict(), args)
    qsd["count"] = {"w": torch.arange(5), "dtype": "int64"}
    qsd["empty"] = {"w": torch.zeros(0, 3), "dtype": "float32"}
    return qsd


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("compressor", [*sorted(tg.COMPRESSORS), "best"])
def test_every_compressor_round_trips_bit_exactly(compressor, shuffle):
    qsd = _qsd()
    blob = tg.pack_artifact(qsd, {"MODEL": "gpt", "SEED": 3}, compressor, shuffle)
    back, settings = tg.unpack_artifact(blob)
    assert settings == {"MODEL": "gpt", "SEED": 3} and back.keys() == qsd.keys()
    for name, e in qsd.items():
        assert back[name].keys() == e.keys()
        for part in e:
            assert e[part] == back[name][part] if part == "dtype" else torch.equal(e[part], back[name][part])
    with pytest.raises(tg.ConfigError, match="magic"):
        tg.unpack_artifact(b"nonsense")


@pytest.mark.parametrize("compressor", [*sorted(tg.COMPRESSORS), "best", "starter"])
def test_a_flipped_byte_or_a_truncation_anywhere_is_a_one_line_corrupt_artifact_error(compressor):
    qsd = _qsd()
    if compressor == "starter":  # the starter's own bytes: zlib's Adler-32 is its checksum
        qsd = tg.quantize_starter_int8(small_model()[0].state_dict())
    fmt = "starter" if compressor == "starter" else "pgolf"
    _, blob, _ = tg.prune_to_fit(qsd, {"SEED": 3}, "zlib" if fmt == "starter" else compressor, True, 10**9, fmt)
    assert blob.startswith(tg.STARTER_MAGIC if fmt == "starter" else tg.SEAL_MAGIC)
    tg.unpack_artifact(blob, "m.pgolf")  # the sealed blob reads back
    n = len(blob)
    bad = [blob[:k] + bytes([blob[k] ^ 0x10]) + blob[k + 1 :] for k in (3, 7, 11, 20, n // 3, n // 2, n - 5, n - 1)]
    bad += [blob[:k] for k in (5, 12, n // 2, n - 1)]
    for b in bad:
        with pytest.raises(tg.ConfigError) as e:
            tg.unpack_artifact(b, "m.pgolf")
        msg = str(e.value)
        assert "\n" not in msg and "m.pgolf" in msg and ("checksum mismatch" in msg or "bad magic" in msg), msg


def test_an_artifact_without_a_seal_still_reads():
    qsd = _qsd()
    back, settings = tg.unpack_artifact(tg.pack_artifact(qsd, {"SEED": 3}, "zlib"))
    assert settings == {"SEED": 3} and back.keys() == qsd.keys()


def test_best_compressor_keeps_the_smallest_and_shuffle_helps_floats():
    qsd = _qsd()
    sizes = {c: len(tg.pack_artifact(qsd, {}, c)) for c in tg.available_compressors() if c in tg.BEST_COMPRESSORS}
    best = tg.pack_artifact(qsd, {}, "best")
    assert len(best) == min(sizes.values()) and tg.artifact_compressor(best) in sizes
    floats = {"x": {"w": (0.02 * torch.randn(256, 256)).half(), "dtype": "float32"}}
    assert len(tg.pack_artifact(floats, {}, "zlib", True)) < len(tg.pack_artifact(floats, {}, "zlib", False))


def test_default_zpaqg_round_trips_exactly_groups_tensors_and_is_no_larger_than_best():
    """The default compressor on a small stand-in (int6 GPTQ-like codes of two layers): the dequantized weights come
    back bit for bit, each tensor group is one run of the payload, and the artifact is no larger than best's."""
    assert tg.Hyperparameters().compressor == "zpaqg"
    torch.manual_seed(0)
    sd = {f"blocks.{i}.{m}.weight": 0.02 * torch.randn(256, 128) * torch.rand(256, 1).add(0.5)
          for i in range(2) for m in ("attn.c_q", "mlp.fc")}
    qsd = tg.quantize_state_dict(sd, tg.Hyperparameters({"QUANT": "int6", "QUANT_FLOAT_MAX": "4096"}))
    blob = tg.pack_artifact(qsd, {}, "zpaqg")
    back, _ = tg.unpack_artifact(blob)
    ours, theirs = tg.dequantize_state_dict(back), tg.dequantize_state_dict(qsd)
    assert all(torch.equal(ours[n], theirs[n]) for n in sd)
    payload = tg._zpaq().decompress(blob[len(tg.ARTIFACT_MAGIC) + 1 + len("zpaqg") :])
    table = json.loads(payload[4 : 4 + int.from_bytes(payload[:4], "little")])["tensors"]
    codes = [name for name, part, *_ in sorted(table, key=lambda r: r[4]) if part == "q"]
    assert codes == [f"blocks.{i}.{m}.weight" for m in ("attn.c_q", "mlp.fc") for i in range(2)]
    assert len(blob) <= len(tg.pack_artifact(qsd, {}, "best"))


@pytest.mark.parametrize("compressor", sorted(tg.COMPRESSORS))
def test_a_damaged_or_unknown_artifact_is_refused_in_one_line(compressor):
    blob = tg.pack_artifact({"w": {"w": torch.randn(64, 64), "dtype": "float32"}}, {}, compressor)
    head = len(tg.ARTIFACT_MAGIC) + 1 + len(compressor)
    flipped = blob[:head] + bytes(b ^ 0x55 for b in blob[head : head + 64]) + blob[head + 64 :]
    for bad in (blob[: len(blob) // 2], flipped):
        with pytest.raises(tg.ConfigError, match=f"its {compressor} payload does not decode") as e:
            tg.unpack_artifact(bad, "final_model.ptz")
        assert "\n" not in str(e.value) and str(e.value).startswith("final_model.ptz: ")
    with pytest.raises(tg.ConfigError, match="'xz9' is unknown or not installed"):
        tg.unpack_artifact(tg.ARTIFACT_MAGIC + bytes([3]) + b"xz9" + blob[head:])


def test_int6_best_is_much_smaller_than_int8_zlib():
    torch.manual_seed(0)
    sd = {f"blocks.{i}.mlp.fc.weight": 0.02 * torch.randn(512, 256) for i in range(4)}
    sizes = {q: len(tg.pack_artifact(tg.quantize_state_dict(sd, tg.Hyperparameters({"QUANT": q})), {}, c))
             for q, c in [("int8", "zlib"), ("int6", "best")]}
    assert sizes["int6"] < 0.7 * sizes["int8"], sizes


def test_packed_code_is_the_same_source():
    source = (ROOT / "train_gpt.py").read_bytes()
    packed = tg.pack_code(source)
    assert packed.startswith(tg.CODE_PACK_HEAD) and len(packed) < 0.5 * len(source)
    assert tg.plain_code(packed) == source and tg.plain_code(source) == source


# -----------------------------
# The cap
# -----------------------------

def test_cap_remedy_zeroes_the_smallest_weights_until_it_fits():
    qsd = _qsd()
    full = len(tg.seal_artifact(tg.pack_artifact(qsd, {}, "zlib")))
    out, blob, pruned = tg.prune_to_fit(qsd, {}, "zlib", True, int(0.9 * full))
    assert pruned > 0 and len(blob) <= 0.9 * full
    back, _ = tg.unpack_artifact(blob)
    zeroed = []
    for name, e in qsd.items():
        if "q" in e:
            assert torch.equal(back[name]["q"], out[name]["q"])
            gone = (e["q"] != 0) & (out[name]["q"] == 0)
            assert torch.equal(out[name]["q"][~gone], e["q"][~gone])
            zeroed.append((e["q"].float().abs() * e["scale"].float()[:, None]))
    mags = torch.cat([z.flatten() for z in zeroed])
    kept = torch.cat([(out[n]["q"].float().abs() * out[n]["scale"].float()[:, None]).flatten() for n in out if "q" in out[n]])
    assert int(((mags > 0) & (kept == 0)).sum()) == pruned
    assert mags[(mags > 0) & (kept == 0)].max() <= kept[kept > 0].min()  # the smallest went first
    assert tg.prune_to_fit(qsd, {}, "zlib", True, full)[2] == 0  # already under: untouched


# Runs train_gpt.main() with the val shards moved away while GPTQ calibrates and every shard read recorded.
CALIBRATION_PROBE = """
import sys
from pathlib import Path
import train_gpt as tg
phase, opened = ["setup"], []
load, collect = tg.load_data_shard, tg.collect_hessians
def recorded(file, *a, **k):
    opened.append((phase[0], Path(file).name))
    return load(file, *a, **k)
def calibrating(*a, **k):
    val = sorted(Path(sys.argv[1]).glob("fineweb_val_*.bin"))
    for f in val:
        f.rename(f.with_suffix(".hidden"))
    phase[0] = "calibration"
    try:
        return collect(*a, **k)
    finally:
        phase[0] = "export"
        for f in val:
            f.with_suffix(".hidden").rename(f)
tg.load_data_shard, tg.collect_hessians = recorded, calibrating
tg.main()
print("opened:", opened)
"""


@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_over_cap_run_is_pruned_under_the_cap_and_calibration_reads_no_val(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0], data)
    total = int(re.search(r"^artifact:\S+ .* total_bytes:(\d+)", tiny_run[1], re.M).group(1))
    margin = tg.SIZE_CAP_BYTES - int(0.9 * total)
    env = data_env((data, tiny_data[1]), RUN_ID="cap", SEED="1", SIZE_MARGIN_BYTES=str(margin), GPTQ_CALIB_BATCHES="2",
                   QAT_START="0.5")
    proc = subprocess.run([sys.executable, "-c", CALIBRATION_PROBE, str(data)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **TINY_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "cap.txt").read_text()
    opened = eval(proc.stdout.split("opened:", 1)[1])
    assert not [f for p, f in opened if p == "calibration" and "val" in f], opened
    assert re.search(r"^qat:on step:15/30 train_time:\d+ms quant:int6/int6$", log, re.M)
    qat = float(re.search(r"^final_int6_qat_exact val_loss:\S+ val_bpb:(\S+)$", log, re.M).group(1))
    pre = float(re.search(r"^final_prequant_exact val_loss:\S+ val_bpb:(\S+)$", log, re.M).group(1))
    assert qat != pre  # the QAT stage really scores the quantized forward
    assert re.search(r"^gptq_calibration batches:2 tokens:4096 matrices:\d+ time:\d+ms$", log, re.M)
    assert re.search(r"^cap_remedy:prune zeroed_weights:[1-9]\d* of:\d+ model_bytes:\d+ max_model_bytes:\d+$", log, re.M)
    final_total = int(re.search(r"^artifact:\S+ .* total_bytes:(\d+) cap:16000000 under_cap:1$", log, re.M).group(1))
    assert final_total <= tg.SIZE_CAP_BYTES - margin < total
    assert not re.search(r"^WARNING", log, re.M)


# -----------------------------
# End to end: stages, scoring an artifact alone
# -----------------------------

def test_run_logs_calibration_and_the_gap_by_stage(tiny_run):
    cwd, log, _ = tiny_run
    assert not re.search(r"^(qat:on|final_int6_qat)", log, re.M)  # QAT is off by default
    assert re.search(r"^gptq_calibration batches:2 tokens:4096 matrices:\d+ time:\d+ms$", log, re.M)
    assert re.search(r"^code plain_bytes:(\d+) packed_bytes:(\d+) counted:packed sha256:[0-9a-f]{64}$", log, re.M)
    assert re.search(r"^compress:zpaqg setting:zpaqg model_bytes:\d+ time:\d+ms$", log, re.M)
    fmt = re.search(r"^artifact:\S+ format:(int6_\w+) ", log, re.M).group(1)
    for stage in ("prequant", "int6_gptq", f"{fmt}_roundtrip"):
        assert re.search(rf"^final_{stage} val_loss:\d+\.\d{{4}} val_bpb:\d+\.\d{{4}} eval_time:\d+ms$", log, re.M), stage
    assert re.search(rf"^quant_gap int6_gptq:[+-]\d\.\d{{4}} {fmt}_roundtrip:[+-]\d\.\d{{4}}$", log, re.M)
    # No remedy was needed, so the file holds exactly the quantized weights scored in memory.
    gptq, roundtrip = (exact_line(log, s).split(" ", 1)[1] for s in ("int6_gptq", f"{fmt}_roundtrip"))
    assert gptq == roundtrip and not re.search(r"^cap_remedy", log, re.M)
    packed = (cwd / "train_gpt.packed.py").read_bytes()
    assert f"code_bytes:{len(packed)} " in log and b"DROPPED_FEATURES='presets'" in tg.plain_code(packed)


def test_packed_copy_scores_the_artifact_alone_exactly_as_the_run_did(tiny_run, tiny_data, tmp_path):
    cwd, log, _ = tiny_run
    only_val = tmp_path / "val_only"  # a reviewer needs the val split and the tokenizer, no training data
    only_val.mkdir()
    for f in tiny_data[0].glob("fineweb_val_*.bin"):
        shutil.copy(f, only_val)
    artifact = next(cwd.glob("final_model.*.pgolf"))
    shutil.copy(cwd / "train_gpt.packed.py", tmp_path / "train_gpt.py")
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RUN_ID": "score",
                               "SCORE_ARTIFACT": str(artifact), "DATA_PATH": str(only_val), "TOKENIZER_PATH": str(tiny_data[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = (tmp_path / "logs" / "score.txt").read_text()
    fmt = re.search(r"^artifact:\S+ format:(\S+) ", log, re.M).group(1)
    assert exact_line(scored, f"{fmt}_roundtrip") == exact_line(log, f"{fmt}_roundtrip")
    assert scored.rstrip("\n").splitlines()[-1] == log.rstrip("\n").splitlines()[-1]
    assert re.search(r"^artifact:\S+ format:\S+ model_bytes:\d+ code_bytes:\d+ total_bytes:\d+ cap:16000000 under_cap:1$",
                     scored, re.M)
