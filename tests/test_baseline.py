"""BASELINE=1 is the challenge's starter: checked against the starter script's own functions (model, gradients, a
Muon step, a bf16 forward, the int8 + zlib export), imported from ../shared/reference on the CPU."""

import importlib.util
import io
import re
import zlib

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, TINY_ENV, data_env, require_reference, run_train

STARTER_PATH = ROOT.parent / "shared" / "reference" / "starter" / "train_gpt.py"


@pytest.fixture(autouse=True)
def starter_script():
    require_reference(STARTER_PATH)


CPU = torch.device("cpu")
# c_q is exactly 65,536 values (kept float by the starter), c_k/c_v fewer, the MLP and the embedding more (int8).
SHAPE = {"VOCAB_SIZE": "512", "NUM_LAYERS": "3", "MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"}


@pytest.fixture(scope="module")
def starter():
    require_reference(STARTER_PATH)  # module fixtures come before the autouse check
    spec = importlib.util.spec_from_file_location("starter_train_gpt", STARTER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pair(starter, seed=0, **env):
    """(starter's GPT, our GPT under BASELINE=1, our Hyperparameters), each built from the same seed."""
    args = tg.Hyperparameters({"BASELINE": "1", **SHAPE, **env})
    torch.manual_seed(seed)
    theirs = starter_gpt(starter, args)
    torch.manual_seed(seed)
    ours = tg.build_model(args, CPU)
    return theirs, ours, args


def starter_gpt(starter, args):
    return starter.GPT(vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim,
                       num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult,
                       tie_embeddings=args.tie_embeddings, tied_embed_init_std=args.tied_embed_init_std,
                       logit_softcap=args.logit_softcap, rope_base=args.rope_base, qk_gain_init=args.qk_gain_init)


def trained_like(model, seed=1):
    """The same weights moved off the init (zero-init projections included); a few rows with |w| over 1, so the
    starter's percentile clip sets their grid and not its 1/127 floor."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        t = t + 0.05 * torch.randn(t.shape, generator=g)
        if t.ndim == 2 and t.size(0) > 8:
            t[:4] *= 40
        sd[name] = t
    return sd


def batch(seq_len=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, int(SHAPE["VOCAB_SIZE"]), (2, seq_len + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def starter_blob(starter, state_dict) -> bytes:
    obj, _ = starter.quantize_state_dict_int8(state_dict)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), level=9)


def test_baseline_preset_turns_every_starter_difference_on():
    args = tg.Hyperparameters({"BASELINE": "1"})
    assert (args.export_format, args.code_pack, args.softcap_fp32, args.rope_fp32, args.sdp_backends) == \
        ("starter", False, False, False, "flash")
    assert args.artifact_path == "final_model.int8.ptz"  # the starter's file name
    ours = tg.Hyperparameters({})
    assert (ours.export_format, ours.code_pack, ours.softcap_fp32, ours.rope_fp32) == ("pgolf", True, True, True)


@pytest.mark.parametrize("env,needle", [
    ({"EXPORT_FORMAT": "torch"}, "EXPORT_FORMAT"), ({"EXPORT_FORMAT": "starter"}, "EXPORT_FORMAT=starter"),
    ({"BASELINE": "1", "LOWRANK_RANK": "2"}, "LOWRANK_RANK=0"), ({"BASELINE": "1", "COMPRESSOR": "lzma"}, "COMPRESSOR=zlib"),
    ({"BASELINE": "1", "QUANT_EMBED": "int6"}, "QUANT_EMBED"), ({"SDP_BACKENDS": "flash,xformers"}, "SDP_BACKENDS"),
    ({"SDP_BACKENDS": ""}, "SDP_BACKENDS"), ({"BASELINE": "1", "EVAL_ISOLATE_DOCS": "1"}, "EVAL_ISOLATE_DOCS"),
    ({"SOFTCAP_FP32": "2"}, "SOFTCAP_FP32"), ({"ROPE_FP32": "yes"}, "ROPE_FP32"),
])
def test_bad_baseline_settings_raise_config_errors(env, needle):
    with pytest.raises(tg.ConfigError, match=re.escape(needle)):
        tg.Hyperparameters(env)


def test_baseline_with_gptq_is_valid_and_exports_as_the_starter():
    # GPTQ's fp32 calibration forward allows every kernel itself; the starter's export rounds to nearest.
    args = tg.Hyperparameters({"BASELINE": "1", "GPTQ": "1"})
    assert args.sdp_backends == "flash" and args.export_format == "starter"


def test_sdp_backends_switch_the_cuda_kernels():
    saved = {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in tg.SETTINGS['SDP_BACKENDS'].check}
    try:
        tg.enable_sdp_backends("flash")
        assert {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in tg.SETTINGS['SDP_BACKENDS'].check} == \
            {"flash": True, "mem_efficient": False, "math": False, "cudnn": False}
        tg.enable_sdp_backends(tg.Hyperparameters({}).sdp_backends)
        assert {b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in tg.SETTINGS['SDP_BACKENDS'].check} == \
            {"flash": True, "mem_efficient": True, "math": True, "cudnn": False}
    finally:
        for b, on in saved.items():
            getattr(torch.backends.cuda, f"enable_{b}_sdp")(on)


# -----------------------------
# Model, gradients, optimizer (float32)
# -----------------------------

def test_init_loss_gradients_and_a_muon_step_are_the_starters_in_fp32(starter, monkeypatch):
    theirs, ours, args = pair(starter, seed=5)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in theirs.state_dict().items())  # the seeded init
    sd = trained_like(ours)
    theirs.load_state_dict(sd), ours.load_state_dict(sd)
    x, y = batch()
    loss_theirs, loss_ours = theirs(x, y), ours(x, y).mean()
    # The same per-token losses; their mean is reduced in another order (F.cross_entropy's fused mean against our
    # per-token losses' .mean(), which the token-loss dump needs): equal to within one float32 ulp.
    assert torch.allclose(loss_theirs, loss_ours, rtol=2 ** -23, atol=0)
    loss_theirs.backward(), loss_ours.backward()
    grads = dict(ours.named_parameters())
    assert all(torch.equal(p.grad, grads[n].grad) for n, p in theirs.named_parameters())

    # One Muon step. The starter orthogonalizes in bf16 everywhere, ours in bf16 on CUDA and fp32 on a CPU: here
    # ours calls the starter's Newton-Schulz, so the step around it (momentum, Nesterov, shape scale, lr) is compared.
    # Ours orthogonalizes a stack of same-shape matrices in one call: the starter's, one matrix at a time.
    monkeypatch.setattr(tg, "zeropower_via_newtonschulz5", lambda G, steps, eps, coeffs: torch.stack(
        [starter.zeropower_via_newtonschulz5(g, steps, eps) for g in G]))
    _, muon = tg.build_optimizers(args, ours)
    # The starter's main() gives Muon the block matrices that are not control tensors.
    their_names = [f"blocks.{n}" for n, p in theirs.blocks.named_parameters()
                   if p.ndim == 2 and not any(pat in n for pat in starter.CONTROL_TENSOR_NAME_PATTERNS)]
    names = {id(p): n for n, p in ours.named_parameters()}
    assert [names[id(p)] for p in muon.param_groups[0]["params"]] == their_names
    their_params = dict(theirs.named_parameters())
    their_muon = starter.Muon([their_params[n] for n in their_names], lr=args.matrix_lr, momentum=args.muon_momentum,
                              backend_steps=args.muon_backend_steps)
    muon.step(), their_muon.step()
    after = dict(ours.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in theirs.named_parameters())
    assert not torch.equal(after["blocks.0.mlp.fc.weight"], sd["blocks.0.mlp.fc.weight"])


# -----------------------------
# GPU precision, emulated in bf16 on the CPU
# -----------------------------

def test_bf16_forward_is_the_starters_and_each_precision_setting_matters(starter):
    """The starter's CUDA layout (.bfloat16(), linear weights and control tensors back to fp32) on both models,
    then an eager bf16 forward over 320 positions (beyond 256, bf16 rounds the starter's RoPE positions)."""
    x, y = batch(seq_len=320)
    losses = {}
    for label, env in {"baseline": {}, "softcap_fp32": {"SOFTCAP_FP32": "1"}, "rope_fp32": {"ROPE_FP32": "1"}}.items():
        theirs, ours, args = pair(starter, seed=7, **env)
        sd = trained_like(ours, seed=3)
        theirs.load_state_dict(sd), ours.load_state_dict(sd)
        theirs.bfloat16()
        for m in theirs.modules():
            if isinstance(m, starter.CastedLinear):
                m.float()
        starter.restore_low_dim_params_to_fp32(theirs)
        tg.cuda_layout(ours, args)
        dtypes = {k: v.dtype for k, v in ours.state_dict().items()}
        assert {k: v.dtype for k, v in theirs.state_dict().items()} == dtypes
        inv_freq = ours.blocks[0].attn.rotary.inv_freq
        assert inv_freq.dtype == (torch.float32 if args.rope_fp32 else torch.bfloat16)
        with torch.no_grad():
            losses[label] = (theirs(x, y), ours(x, y).mean())
    assert torch.equal(*losses["baseline"])
    assert not torch.equal(*losses["softcap_fp32"]) and not torch.equal(*losses["rope_fp32"])


# -----------------------------
# The export
# -----------------------------

@pytest.mark.parametrize("layout", ["fp32", "bf16"])
def test_starter_export_is_the_starters_bytes_and_dequantized_weights(starter, layout):
    _, ours, args = pair(starter)
    ours.load_state_dict(trained_like(ours))
    if layout == "bf16":  # the CUDA layout: a bf16 embedding, quantized and restored as bf16
        tg.cuda_layout(ours, args)
    sd = ours.state_dict()
    qsd = tg.quantize_state_dict(sd, args)
    assert sum("q" in e for e in qsd.values()) == 3 * 2 + 1  # fc and proj per block, and the embedding
    assert "q" not in qsd["blocks.0.attn.c_q.weight"] and qsd["blocks.0.attn.c_q.weight"]["w"].dtype == torch.float16
    blob = tg.pack_artifact(qsd, args.settings, args.compressor, args.byte_shuffle, args.export_format)
    assert blob == starter_blob(starter, sd)
    theirs = starter.dequantize_state_dict_int8(torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu"))
    back, settings = tg.unpack_artifact(blob)
    mine = tg.dequantize_state_dict(back)
    assert settings is None and mine.keys() == theirs.keys() == sd.keys()
    for name, t in theirs.items():
        assert t.dtype == mine[name].dtype == sd[name].dtype and torch.equal(t, mine[name]), name
    # The percentile clip binds on the large rows, the 1/127 floor on the others.
    scale = back["blocks.0.mlp.fc.weight"]["scale"].float()
    assert scale[4:].eq(torch.tensor(1 / 127).half().float()).all() and (scale[:4] > 1 / 127).all()


def test_a_starter_artifact_loads_with_the_runs_settings_only(starter):
    _, ours, args = pair(starter)
    ours.load_state_dict(trained_like(ours))
    blob = starter_blob(starter, ours.state_dict())
    fresh, fresh_args = tg.model_from_artifact(blob, CPU, "final_model.int8.ptz", args)
    theirs = starter.dequantize_state_dict_int8(torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu"))
    assert fresh_args is args and all(torch.equal(v, theirs[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(tg.ConfigError, match="carries no settings"):
        tg.model_from_artifact(blob, CPU, "final_model.int8.ptz")
    wider = tg.Hyperparameters({**SHAPE, "BASELINE": "1", "MLP_MULT": "3"})
    with pytest.raises(tg.ConfigError, match="BASELINE=1"):
        tg.model_from_artifact(blob, CPU, "final_model.int8.ptz", wider)
    with pytest.raises(tg.ConfigError, match="not the starter"):
        tg.unpack_artifact(zlib.compress(b"not a torch archive", 9))


@pytest.mark.slow
def test_baseline_run_writes_the_starters_artifact_and_scores_it_alone(starter, tiny_data, tmp_path):
    # 192 wide: the embedding and the MLP matrices are over 65,536 values, so the run quantizes some of them.
    env = data_env(tiny_data, BASELINE="1", MODEL_DIM="192", ITERATIONS="8", RUN_ID="base", SEED="3")
    run_train(tmp_path, env)
    log = (tmp_path / "logs" / "base.txt").read_text()
    code = len((ROOT / "train_gpt.py").read_bytes())
    assert "counted:plain" in log
    assert re.search(rf"^artifact:final_model\.int8\.ptz format:int8_zlib .*code_bytes:{code} ", log, re.M)
    roundtrip = re.search(r"^final_int8_zlib_roundtrip_exact .*$", log, re.M).group(0)
    # The starter's own loader reads the artifact into its model.
    blob = (tmp_path / "final_model.int8.ptz").read_bytes()
    obj = torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu")
    assert obj["__quant_format__"] == "int8_clean_per_row_v1" and "tok_emb.weight" in obj["quantized"]
    theirs = starter_gpt(starter, tg.Hyperparameters({**TINY_ENV, **env}))
    theirs.load_state_dict(starter.dequantize_state_dict_int8(obj))  # strict: every tensor, every shape
    # Scored alone, with the settings from the env: the same line.
    alone = tmp_path / "alone"
    alone.mkdir()
    run_train(alone, {**env, "RUN_ID": "alone", "SCORE_ARTIFACT": str(tmp_path / "final_model.int8.ptz")})
    assert roundtrip in (alone / "logs" / "alone.txt").read_text()
    wrong = run_train(alone, {**env, "MODEL_DIM": "64", "SCORE_ARTIFACT": str(tmp_path / "final_model.int8.ptz")},
                      check=False)
    assert wrong.returncode == 2 and "BASELINE=1" in wrong.stderr

