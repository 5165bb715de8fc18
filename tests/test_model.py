"""The MODEL section on CPU: the GPT forward (shapes, causality, document isolation), its parameter groups, and
each architecture option (it trains, changes the output, keeps documents apart, survives the artifact)."""

import math

import pytest
import torch

import train_gpt as tg
from conftest import CPU, tiny_args

OPTIONS = [
    {"MLP_ACT": "leaky2"}, {"MLP_ACT": "swiglu"}, {"MLP_MULT": "3"}, {"NORM_PCT_DROPOUT": "0.1"},
    {"ROPE_DIMS": "4"}, {"XSA_LAST_N": "2"}, {"ATTN_GATE_DIMS": "32"}, {"ATTN_GATE_DIMS": "4"},
    {"VALUE_EMBED_LAYERS": "2"}, {"LN_SCALE": "1"}, {"PARALLEL_RESID_FROM": "2"}, {"SKIP_GATE": "1"},
    {"SMEAR_GATE": "1"}, {"BIGRAM_BUCKETS": "16", "BIGRAM_DIM": "8"}, {"RECUR_LAYERS": "1-2", "RECUR_START_FRAC": "0"},
    {"ATTN_GATE_DIMS": "4", "ATTN_GATE_MAX": "1", "ATTN_GATE_SCALE": "0.5"},
    {"SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "4"},
    {"PARALLEL_LANES_FROM": "2"}, {"RECUR_LAYERS": "0-1", "RECUR_START_FRAC": "0", "PARALLEL_LANES_FROM": "3"},
]
EVERYTHING = {"MLP_ACT": "swiglu", "NORM_PCT_DROPOUT": "0.05", "ROPE_DIMS": "4", "XSA_LAST_N": "2",
              "ATTN_GATE_DIMS": "8", "VALUE_EMBED_LAYERS": "2", "LN_SCALE": "1", "ORTHO_INIT": "1",
              "PARALLEL_RESID_FROM": "3", "SKIP_GATE": "1", "SMEAR_GATE": "1", "BIGRAM_BUCKETS": "16",
              "BIGRAM_DIM": "8", "RECUR_LAYERS": "1-2", "RECUR_START_FRAC": "0"}


def build(seed=0, **env):
    """A tiny 4-layer model with every weight perturbed, so that zero-initialized paths contribute too."""
    torch.manual_seed(seed)
    model = tg.build_model(tiny_args(**{"NUM_LAYERS": "4", **env}), CPU)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


def baseline_with_shared_weights(model):
    base = tg.build_model(tiny_args(NUM_LAYERS=4), CPU)
    own = base.state_dict()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False)
    return base


# -----------------------------
# GPT
# -----------------------------


def test_gpt_forward_backward_shapes_and_gradients():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), CPU)
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
    model = tg.build_model(tiny_args(), CPU)
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
    model = tg.build_model(tiny_args(), CPU)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.randint(2, 64, (1, 16))
    x[0, 6] = tg.BOS_ID
    x2 = x.clone()
    x2[0, :6] = torch.randint(2, 64, (6,))  # change only the first document
    y = torch.randint(0, 64, (1, 16))
    assert not torch.allclose(model(x, y)[0, 6:], model(x2, y)[0, 6:])  # without isolation (baseline) it does leak
    z = torch.randint(2, 64, (2, 16))
    plain = model(z, y.expand(2, -1))
    model.doc_attention = True
    a, b = model(x, y), model(x2, y)
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-6) and not torch.allclose(a[0, :6], b[0, :6])
    # With no BOS inside the window, isolation changes nothing.
    assert torch.allclose(model(z, y.expand(2, -1)), plain, atol=1e-6)

def test_param_groups_cover_every_parameter_once():
    model = tg.build_model(tiny_args(TIE_EMBEDDINGS="0"), CPU)
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in groups["matrix"]) and groups["head"]


# -----------------------------
# Architecture options
# -----------------------------


@pytest.mark.parametrize("env", OPTIONS + [EVERYTHING], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_option_trains_and_changes_the_output(env):
    model = build(**env)
    x, y = batch()
    loss = model(x, y)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not torch.allclose(loss, baseline_with_shared_weights(model)(x, y), atol=1e-4)
    groups = model.param_groups()
    assert sorted(id(p) for ps in groups.values() for p in ps) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in groups["matrix"])
    # New gates stay float in the export; new matrices and embeddings are trained as such.
    scalar_names = {n for n, p in model.named_parameters() if any(p is q for q in groups["scalar"])}
    assert all(p.ndim < 2 or any(pat in n for pat in tg.CONTROL_TENSOR_NAME_PATTERNS)
               for n, p in model.named_parameters() if n in scalar_names)

def test_baseline_setting_is_the_starter_model_and_the_default_is_the_stack():
    names = set(tg.build_model(tiny_args(NUM_LAYERS=4), CPU).state_dict())
    assert all(n.startswith(("tok_emb.", "skip_weights", "blocks.")) for n in names)
    assert len(names) == 1 + 1 + 4 * 10  # per block: q, k, v, proj, q_gain, fc, proj, two scales, resid_mix
    stack = tg.build_model(tiny_args(NUM_LAYERS=4, BASELINE=0, STACK="1.1194", ROPE_DIMS=4), CPU)
    extra = {n.split(".")[0] for n in stack.state_dict()} - {n.split(".")[0] for n in names}
    assert {"bigram", "smear_gate", "skip_gates"} <= extra, extra
    assert stack.blocks[0].mlp.fc.weight.shape[0] == 3 * 32

def test_orthogonal_init_leaves_zero_init_projections_at_zero():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(NUM_LAYERS=4, ORTHO_INIT=1), CPU)
    w = model.blocks[0].attn.c_q.weight
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    fc = model.blocks[0].mlp.fc.weight  # 64 x 32: orthonormal columns
    assert torch.allclose(fc.T @ fc, torch.eye(32), atol=1e-5)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0 and model.blocks[0].mlp.proj.weight.abs().sum() == 0

def test_xsa_output_is_orthogonal_to_the_own_value_vector():
    torch.manual_seed(0)
    y, v = torch.randn(2, 4, 8, 6), torch.randn(2, 2, 8, 6)
    out = tg.remove_self_value(y, v)
    v_per_head = v.repeat_interleave(2, dim=1)  # grouped-query SDPA: query head h reads KV head h // 2
    assert (out * v_per_head).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out - y, -(y * v_per_head).sum(-1, keepdim=True) * v_per_head / v_per_head.square().sum(-1, keepdim=True), atol=1e-5)

def test_partial_rope_leaves_the_unrotated_dims_alone():
    rotary = tg.Rotary(4, 10000.0, train_seq_len=16)
    cos, sin = rotary(5, CPU, torch.float32)
    x = torch.randn(1, 2, 5, 8)
    out = tg.apply_rotary_emb(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:]) and not torch.allclose(out[..., :4], x[..., :4])
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation

def test_norm_pct_dropout_acts_in_training_only():
    model = build(NORM_PCT_DROPOUT="0.2")
    plain = baseline_with_shared_weights(model)
    x, y = batch()
    assert not torch.allclose(model(x, y), plain(x, y))
    model.eval(), plain.eval()
    assert torch.equal(model(x, y), model(x, y)) and torch.allclose(model(x, y), plain(x, y), atol=1e-6)

def test_norm_pct_dropout_zeroes_the_largest_rows():
    h = torch.arange(1.0, 11.0)[:, None].expand(10, 3).reshape(1, 10, 3).clone()
    out = tg.norm_pct_dropout(h, 0.2)
    assert out[0, 8:].abs().sum() == 0 and torch.equal(out[0, :8], h[0, :8])

@pytest.mark.parametrize("env", [{"SMEAR_GATE": "1"}, {"SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "4"},
                                 {"BIGRAM_BUCKETS": "16", "BIGRAM_DIM": "8"}, EVERYTHING])
def test_smear_and_bigram_never_mix_across_a_bos(env):
    model = build(**env)
    model.eval()  # Norm-PCT-Dropout picks rows batch-wide in training
    x, y = batch()
    x[:, 6] = tg.BOS_ID
    x2 = x.clone()
    x2[:, :6] = torch.randint(2, 64, (2, 6))  # change only the first document
    model.doc_attention = True
    a, b = model(x, y), model(x2, y)
    assert torch.allclose(a[:, 6:], b[:, 6:], atol=1e-6) and not torch.allclose(a[:, :6], b[:, :6])
    # The stream entering the first block at the BOS sees no previous token, even without isolation.
    model.doc_attention = False
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 6].clone()))
    model(x, y), model(x2, y)
    hook.remove()
    assert torch.allclose(seen[0], seen[1], atol=1e-6)

def test_bigram_buckets_reserve_one_for_positions_without_a_previous_token():
    ids = torch.tensor([[5, 7, tg.BOS_ID, 9, 9]])
    got = tg.bigram_buckets(ids, 16)
    assert got[0, 0] == 15 and got[0, 2] == 15
    assert got[0, 1] == (5 * 92821 + 7) % 15 and got[0, 3] == (tg.BOS_ID * 92821 + 9) % 15
    assert (got < 16).all() and (got >= 0).all()


# -----------------------------
# Depth recurrence
# -----------------------------


def recurrent_model():
    return build(NUM_LAYERS="2", RECUR_LAYERS="0-1", RECUR_LOOPS="3", RECUR_START_FRAC="0.3",
                 ITERATIONS="10", MAX_WALLCLOCK_SECONDS="0")
def test_recurrence_switch_is_a_buffer_that_runs_the_loop():
    model = recurrent_model()
    assert isinstance(model.recur_active, torch.Tensor) and "recur_active" in model.state_dict()
    x, y = batch()
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    before = model(x, y)
    assert len(calls) == 1 and not model.recur_active
    model.set_recurrence(True)  # what the training loop does at RECUR_START_FRAC (tests/test_main.py)
    calls.clear()
    after = model(x, y)
    assert len(calls) == 3 and not torch.allclose(after, before)
    after.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
def test_recurrence_switch_reaches_a_compiled_graph_without_recompiling():
    model = recurrent_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    x, y = batch()
    with torch.no_grad():
        compiled(x, y)
        before = compiled(x, y)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        model.set_recurrence(True)
        after = compiled(x, y)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert not torch.allclose(after, before) and torch.allclose(after, model(x, y), atol=1e-5)

def test_artifact_keeps_the_recurrence_switch():
    model = recurrent_model()
    model.set_recurrence(True)
    args = tiny_args(NUM_LAYERS=2, RECUR_LAYERS="0-1", RECUR_START_FRAC=0.3)
    blob = tg.pack_artifact(tg.quantize_state_dict(model.state_dict(), args), args.settings, "zlib")
    fresh, _ = tg.model_from_artifact(blob, CPU)
    x, y = batch()
    # The quantization roundtrip moves per-token losses by 2.0e-4 at most here (measured); the unlooped order 0.14.
    assert fresh.recur_active and torch.allclose(fresh(x, y), model(x, y), atol=1e-3)

def test_every_option_survives_the_artifact_roundtrip():
    model = build(**EVERYTHING)
    model.eval()
    args = tiny_args(**{"NUM_LAYERS": "4", **EVERYTHING})
    fresh, _ = tg.model_from_artifact(tg.pack_artifact(tg.quantize_state_dict(model.state_dict(), args), args.settings, "zlib"), CPU)
    fresh.eval()
    x, y = batch()
    # The quantization roundtrip moves per-token losses by 1.8e-4 at most here (measured); a lost option far more.
    assert torch.allclose(fresh(x, y), model(x, y), atol=1e-3)
