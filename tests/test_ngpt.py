"""MODEL=ngpt on CPU: sphere constraints and their axes, the opaque normalize, renormalization after
dequantization, evaluation and test-time-training-style steps on the hypersphere model."""

import copy
import re

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import data_env, run_train

TINY = {"MODEL": "ngpt", "STACK": "1.1194", "VOCAB_SIZE": "384", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64", "VAL_BATCH_SIZE": "8192"}
CPU = torch.device("cpu")


def sphere_modules(model):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "_sphere_dim")]


def train(model, args, data_path, steps, tokens=2048):
    torch.manual_seed(0)
    loader = tg.DistributedTokenLoader(str(data_path / "fineweb_train_*.bin"), args.vocab_size, 0, 1)
    optimizers, _ = tg.build_optimizers(args, model)
    for _ in range(steps):
        x, y = loader.next_batch(tokens, args.train_seq_len, 1)
        model(x, y).mean().backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
    return model


@pytest.fixture(scope="module")
def trained(tiny_data):
    """A tiny nGPT (untied head: on the sphere) trained for 60 steps, its settings, val tokens and byte tables."""
    data_path, tok = tiny_data
    args = tg.Hyperparameters({**TINY, "TIE_EMBEDDINGS": "0", "DATA_PATH": str(data_path), "TOKENIZER_PATH": str(tok)})
    torch.manual_seed(0)
    model = train(tg.build_model(args, CPU), args, data_path, 60)
    val = tg.load_validation_tokens(args.val_files, args.vocab_size, args.train_seq_len)
    luts = tg.build_sentencepiece_luts(spm.SentencePieceProcessor(model_file=str(tok)), args.vocab_size, CPU)
    return model, args, val, luts


def val_loss(model, val, n=4096, seq_len=64):
    x, y = val[:n].long().view(-1, seq_len), val[1 : n + 1].long().view(-1, seq_len)
    with torch.no_grad():
        return model(x, y).mean().item()


# -----------------------------
# Sphere constraints
# -----------------------------

def test_each_constrained_matrix_declares_its_d_model_axis():
    args = tg.Hyperparameters({**TINY, "TIE_EMBEDDINGS": "0", "NGPT_NORM_EMBED": "1"})
    model = tg.build_model(args, CPU)
    axes = {name: m._sphere_dim for name, m in sphere_modules(model)}
    block = {"attn.c_q": 1, "attn.c_k": 1, "attn.c_v": 1, "attn.proj": 0, "mlp.fc": 1, "mlp.proj": 0}
    expected = {"tok_emb": 1, "lm_head": 1, **{f"blocks.{i}.{k}": v for i in range(2) for k, v in block.items()}}
    assert axes == expected
    # Rows of the matrices that read the stream, columns of those that write it: always the d_model axis.
    assert all(m.weight.shape[m._sphere_dim] == args.model_dim for _, m in sphere_modules(model))
    # The default leaves the token embedding free, and nothing else is constrained.
    assert "tok_emb" not in {n for n, _ in sphere_modules(tg.build_model(tg.Hyperparameters(TINY), CPU))}


@pytest.mark.parametrize("env", [{}, {"TIE_EMBEDDINGS": "0", "NGPT_NORM_EMBED": "1"}])
def test_optimizer_steps_keep_matrices_and_hidden_states_on_the_sphere(tiny_data, env):
    args = tg.Hyperparameters({**TINY, **env})
    torch.manual_seed(0)
    model = train(tg.build_model(args, CPU), args, tiny_data[0], 5)
    for name, m in sphere_modules(model):
        norms = m.weight.norm(dim=m._sphere_dim)
        assert (norms - 1).abs().max() < 1e-5, name
    states = []
    hooks = [b.register_forward_hook(lambda m, i, out: states.append(out)) for b in model.blocks]
    x = torch.randint(0, args.vocab_size, (2, 64))
    model(x, x)
    for h in hooks:
        h.remove()
    assert len(states) == 2 and all((s.norm(dim=-1) - 1).abs().max() < 1e-5 for s in states)


def test_sphere_matrices_get_no_weight_decay_and_the_ema_average_is_put_back_on_the_sphere():
    args = tg.Hyperparameters({**TINY, "ADAM_WD": "0.1", "EMBED_WD": "0.1"})
    model = tg.build_model(args, CPU)
    assert model.weight_decays(args) == {"matrix": 0.0, "embed": 0.1, "head": 0.1, "scalar": 0.1}
    optimizers, muon = tg.build_optimizers(args, model)
    assert not muon._optimizer_step_pre_hooks  # AdamW decays by itself
    assert all(g["weight_decay"] == 0.1 for opt in optimizers if opt is not muon for g in opt.param_groups)
    model = tg.build_model(tg.Hyperparameters(TINY), CPU)
    ema = tg.WeightEMA(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for _, m in sphere_modules(model):
                m.weight.add_(torch.randn_like(m.weight))
        model.after_optimizer_step()
        ema.update()
    ema.apply()
    assert all((m.weight.norm(dim=m._sphere_dim) - 1).abs().max() > 1e-3 for _, m in sphere_modules(model))
    model.after_load()  # what main() calls after applying the EMA
    assert all((m.weight.norm(dim=m._sphere_dim) - 1).abs().max() < 1e-5 for _, m in sphere_modules(model))


def test_bigram_hash_feeds_ngpt_off_the_sphere_and_changes_its_output(tiny_data):
    args = tg.Hyperparameters({**TINY, "BIGRAM_BUCKETS": "2048"})
    torch.manual_seed(0)
    model = tg.build_model(args, CPU)
    assert model.bigram is not None and model.bigram_proj.weight.abs().sum() == 0
    model = train(model, args, tiny_data[0], 3)
    assert model.bigram_proj.weight.abs().sum() > 0 and not hasattr(model.bigram_proj, "_sphere_dim")
    x = torch.randint(0, args.vocab_size, (2, 64))
    with torch.no_grad():
        out = model(x, x)
        model.bigram_proj.weight.zero_()
        assert not torch.allclose(out, model(x, x))


def test_attention_takes_the_gate_on_every_layer_and_no_xsa_and_no_zero_projection():
    model = tg.build_model(tg.Hyperparameters({**TINY, "NUM_LAYERS": "4", "ATTN_GATE_DIMS": "8"}), CPU)
    assert all(b.attn.attn_gate.shape == (2, 8) and not b.attn.xsa for b in model.blocks)  # as GPT's gate; no XSA
    assert all((b.attn.proj.weight.norm(dim=0) - 1).abs().max() < 1e-5 for b in model.blocks)  # unit columns, not 0
    with pytest.raises(tg.ConfigError, match="XSA_LAST_N"):
        tg.Hyperparameters({**TINY, "XSA_LAST_N": "2"})


def test_attention_uses_softmax_scale_sqrt_head_dim_once():
    model = tg.build_model(tg.Hyperparameters(TINY), CPU)
    attn = model.blocks[0].attn
    assert attn.softmax_scale == attn.head_dim ** 0.5
    q, k = attn.position_qk(torch.randn(1, 2, 8, 32), torch.randn(1, 1, 8, 32), *attn.rotary(8, CPU, torch.float32))
    # s_qk is 1 at init and q, k are unit vectors: the largest logit SDPA can form is sqrt(head_dim), not head_dim^1.5.
    assert torch.allclose(q.norm(dim=-1), torch.ones(1, 2, 8)) and torch.allclose(k.norm(dim=-1), torch.ones(1, 1, 8))


# -----------------------------
# The opaque normalize
# -----------------------------

def test_opaque_normalize_equals_f_normalize_and_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32)
    assert torch.allclose(tg.sphere_normalize(x), F.normalize(x, dim=-1), atol=1e-7)
    assert torch.allclose(tg.plain_normalize(x), F.normalize(x, dim=-1), atol=1e-7)
    # bf16 in, fp32 out: the result is not rounded back to bf16.
    xb = x.bfloat16()
    assert tg.sphere_normalize(xb).dtype == torch.float32
    assert torch.allclose(tg.sphere_normalize(xb), F.normalize(xb.float(), dim=-1), atol=1e-7)
    x64 = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tg.sphere_normalize, (x64,))
    xg = xb.requires_grad_()
    tg.sphere_normalize(xg).sum().backward()
    assert xg.grad.dtype == torch.bfloat16


# -----------------------------
# Export and evaluation
# -----------------------------

def quant_args(args, bits, k=None):
    """args with every block matrix at int<bits> (and SDClip k, if given): round to nearest, no GPTQ."""
    q = copy.copy(args)
    q.quant_attn = q.quant_mlp = f"int{bits}"
    q.quant_float_max = 0  # every matrix of the tiny model
    if k is not None:
        q.sdclip_k_attn = q.sdclip_k_mlp = q.sdclip_k_embed = k
    return q


def roundtrip(model, args, bits, renormalize, k=None):
    qsd = tg.quantize_state_dict(model.state_dict(), quant_args(args, bits, k))
    fresh = tg.build_model(args, CPU)
    fresh.load_state_dict(tg.dequantize_state_dict(qsd))
    if renormalize:
        fresh.after_load()
    return fresh


def test_renormalizing_after_dequantization_shrinks_the_roundtrip_gap(trained, monkeypatch):
    model, args, val, _ = trained
    pre = val_loss(model, val)

    def gaps(bits, k=None):
        return [val_loss(roundtrip(model, args, bits, renorm, k), val) - pre for renorm in (False, True)]

    # Unbiased rounding (SDClip's default k clips almost nothing here) barely moves row norms: about neutral.
    for bits in (8, 6):
        raw, renorm = gaps(bits)
        assert abs(renorm - raw) < 2e-3, (bits, raw, renorm)
    # A clipping quantizer (a small SDClip k) shrinks rows: renormalizing wins back most of the gap.
    for bits in (8, 6):
        raw, renorm = gaps(bits, k=1.0)
        assert raw > 0.01 and renorm < 0.6 * raw, (bits, raw, renorm)
    fixed = roundtrip(model, args, 6, True)
    assert all((m.weight.norm(dim=m._sphere_dim) - 1).abs().max() < 1e-5 for _, m in sphere_modules(fixed))


def test_control_tensors_pass_through_quantization_in_fp32(trained, monkeypatch):
    model, _, _, _ = trained
    qsd = tg.quantize_state_dict(model.state_dict(), quant_args(trained[1], 6))
    controls = [n for n in qsd if n.rsplit(".", 1)[-1] in ("attn_alpha", "mlp_alpha", "s_qk", "s_uv", "s_z")]
    assert len(controls) == 1 + 2 * 4
    for name in controls:
        assert qsd[name]["w"].dtype == torch.float32 and torch.equal(qsd[name]["w"], model.state_dict()[name])


def test_sliding_window_evaluation_is_finite_and_leaves_the_artifact_unchanged(trained):
    model, args, val, luts = trained
    blob = tg.pack_artifact(tg.quantize_state_dict(model.state_dict(), args), args.settings, "zlib")
    fresh, fresh_args = tg.model_from_artifact(blob, CPU)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    full = tg.evaluate(fresh_args, fresh, val[:3000], luts, 0, 1, CPU)
    sliding = tg.evaluate(fresh_args, fresh, val[:3000], luts, 0, 1, CPU, stride=16)
    assert all(torch.isfinite(torch.tensor(r[:2])).all() for r in (full, sliding))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert tg.pack_artifact(tg.quantize_state_dict(fresh.state_dict(), fresh_args), fresh_args.settings, "zlib") == \
        tg.pack_artifact(tg.quantize_state_dict(before, fresh_args), fresh_args.settings, "zlib")


def test_sgd_steps_with_projection_stay_finite_and_touch_only_constrained_matrices(trained):
    model, args, val, _ = trained
    # TTT's learning rates (0.002-0.005) and 100x more: projection keeps the matrices bounded either way.
    for lr in (0.005, 0.5):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        x, y = val[:2048].long().view(-1, 64), val[1:2049].long().view(-1, 64)
        for _ in range(5):
            loss = net(x, y).mean()
            assert torch.isfinite(loss), lr
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            free = {n: p.detach().clone() for n, p in net.named_parameters() if p.ndim < 2 or n == "tok_emb.weight"}
            net.after_optimizer_step()
            assert all(torch.equal(p, free[n]) for n, p in net.named_parameters() if n in free)
            assert all((m.weight.norm(dim=m._sphere_dim) - 1).abs().max() < 1e-5 for _, m in sphere_modules(net))
        assert torch.isfinite(net(x, y)).all()


# -----------------------------
# End to end
# -----------------------------

@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_ngpt_run_trains_exports_and_scores_its_roundtrip(tiny_data, tmp_path):
    run_train(tmp_path, data_env(tiny_data, RUN_ID="ngpt", MODEL="ngpt", ITERATIONS="12"))
    log = (tmp_path / "logs" / "ngpt.txt").read_text()
    assert "setting:MODEL=ngpt" in log and "setting:NGPT_OPAQUE_NORM=1" in log
    pre = float(re.search(r"^final_prequant_exact val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    post = float(re.search(r"^final_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    assert abs(post - pre) < 0.02
    model, _ = tg.model_from_artifact((tmp_path / "final_model.int6.pgolf").read_bytes(), CPU)
    assert all((m.weight.norm(dim=m._sphere_dim) - 1).abs().max() < 1e-5 for _, m in sphere_modules(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opaque", ["1", "0"])
def test_compiled_bf16_ngpt_matches_eager_fp32_on_cuda(opaque):
    torch.manual_seed(0)
    args = tg.Hyperparameters({**TINY, "NUM_LAYERS": "8", "NGPT_OPAQUE_NORM": opaque})
    model = tg.build_model(args, torch.device("cuda"))
    x = torch.randint(0, args.vocab_size, (4, 64), device="cuda")
    eager = model(x, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(model, dynamic=False, fullgraph=True)(x, x)
    assert (compiled - eager).abs().max() < 5e-2
