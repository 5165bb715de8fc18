"""MODEL=ngpt's options from seed 001 (nGPT + Muon at toy scale), each against the invariant it promises: seed 001's
residual rule and cosine logits against formulas computed here, lazy projection (unit norms every N steps, not in
between), geodesic Muon (on the sphere with no projection, and equal to a rotation matrix built here)."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

TINY = {"MODEL": "ngpt", "STACK": "1.1194", "VOCAB_SIZE": "384", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64"}
ALL = {"NGPT_ADD_RESIDUAL": "1", "NGPT_COSINE_LOGITS": "1", "NGPT_LOGIT_SCALE_INIT": "10", "NGPT_PROJECT_EVERY": "3",
       "NGPT_GEODESIC": "1"}
CPU = torch.device("cpu")


def build(**env):
    args = tg.Hyperparameters({**TINY, **env})
    torch.manual_seed(0)
    return tg.build_model(args, CPU), args


def batch(seed=1, vocab=384):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 64), generator=g), torch.randint(0, vocab, (4, 64), generator=g)


def step(model, optimizers, muon, seed):
    """One training step as train_step takes it: the model's loss, every optimizer, then the model's hook."""
    x, y = batch(seed)
    model(x, y).mean().backward()
    tg.step_optimizers(optimizers, muon, 0.0)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    model.after_optimizer_step()


def sphere_errors(model):
    """The largest | |row| - 1 | of each sphere matrix along its d_model axis."""
    return {n: (m.weight.norm(dim=m._sphere_dim) - 1).abs().max().item()
            for n, m in model.named_modules() if hasattr(m, "_sphere_dim")}


def test_the_options_default_off_and_only_model_ngpt_reads_them():
    args = tg.Hyperparameters(TINY)
    assert (args.ngpt_add_residual, args.ngpt_cosine_logits, args.ngpt_project_every, args.ngpt_geodesic) == \
        (False, False, 1, False)
    model = tg.build_model(args, CPU)
    assert model.s_z.shape == (384,) and model.blocks[0].attn_alpha.shape == (64,)
    tg.build_optimizers(args, model)
    assert not any(hasattr(p, "_geodesic_dim") for p in model.parameters())
    for name, value in ALL.items():
        if name != "NGPT_LOGIT_SCALE_INIT":
            with pytest.raises(tg.ConfigError, match=f"{name}: not read by MODEL=gpt"):
                tg.Hyperparameters({name: value})
    with pytest.raises(tg.ConfigError, match="NGPT_PROJECT_EVERY=0 is out of range"):
        tg.Hyperparameters({**TINY, "NGPT_PROJECT_EVERY": "0"})


# -----------------------------
# Residual rule and logits
# -----------------------------

def test_add_residual_computes_norm_of_h_plus_signed_scalar_alpha_times_block_output():
    model, args = build(NGPT_ADD_RESIDUAL="1", NGPT_ALPHA_INIT="0.15")
    block = model.blocks[0]
    assert block.attn_alpha.shape == () and block.mlp_alpha.shape == ()
    assert (block.attn_alpha * block.alpha_gain).item() == pytest.approx(0.15)  # NGPT_ALPHA_INIT is the effective value
    with torch.no_grad():
        block.attn_alpha.mul_(-1)  # signed: no |alpha|, as seed 001
        block.mlp_alpha.mul_(2)
    x, _ = batch()
    docs = tg.doc_layout(model, x)
    h = F.normalize(torch.randn(4, 64, 64), dim=-1)
    a1, a2 = -0.15, 0.3
    with torch.no_grad():
        h1 = F.normalize(h + a1 * block.attn(h, docs), dim=-1)
        expected = F.normalize(h1 + a2 * block.mlp(h1), dim=-1)
        out = block(h, docs)
    assert (out - expected).abs().max() < 1e-6
    # The paper's rule (the default) is another function of the same weights.
    paper, _ = build(NGPT_ALPHA_INIT="0.15")
    paper.blocks[0].load_state_dict({k: v.expand(64) if k.endswith("alpha") else v
                                     for k, v in block.state_dict().items()})
    with torch.no_grad():
        assert (paper.blocks[0](h, docs) - expected).abs().max() > 1e-2
    # alpha is trained (Adam, scalar group) and the model's loss reaches it
    model(x, x).mean().backward()
    assert block.attn_alpha.grad is not None and block.attn_alpha.grad != 0
    assert any(block.attn_alpha is p for p in model.param_groups()["scalar"])


@pytest.mark.parametrize("tied", ["1", "0"])
def test_cosine_logits_are_a_learnable_scalar_times_cosines_of_hidden_state_and_output_rows(tied):
    model, args = build(NGPT_COSINE_LOGITS="1", NGPT_LOGIT_SCALE_INIT="12", TIE_EMBEDDINGS=tied)
    assert model.s_z.shape == () and model.s_z.item() == 12.0
    with torch.no_grad():  # output rows off the unit sphere (a free tied embedding is): the forward normalizes them
        w = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
        w.mul_(torch.rand(w.shape[0], 1) * 3 + 0.1)
    x, y = batch()
    hidden = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, out: hidden.append(out))
    loss = model(x, y)
    hook.remove()
    logits = 12.0 * F.normalize(hidden[0].double(), dim=-1) @ F.normalize(w.double(), dim=-1).T
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    assert (loss.double() - expected).abs().max() < 1e-5
    assert logits.abs().max() <= 12.0  # no softcap: the bound is the scale itself
    # s_z learns (Adam's scalar group) and is kept fp32 by the export, as the other control tensors
    optimizers, muon = tg.build_optimizers(args, model)
    step(model, optimizers, muon, 2)
    assert model.s_z.item() != 12.0 and any(model.s_z is p for p in model.param_groups()["scalar"])
    qsd = tg.quantize_state_dict(model.state_dict(), args)
    assert qsd["s_z"]["w"].dtype == torch.float32 and torch.equal(qsd["s_z"]["w"], model.s_z.detach())


# -----------------------------
# Projection and geodesic updates
# -----------------------------

def test_lazy_projection_puts_matrices_on_the_sphere_every_nth_step_and_not_in_between():
    model, args = build(NGPT_PROJECT_EVERY="3")
    optimizers, muon = tg.build_optimizers(args, model)
    state = copy.deepcopy(model.state_dict())
    for i in range(1, 8):
        step(model, optimizers, muon, i)
        errors = sphere_errors(model)
        if i % 3:
            assert min(errors.values()) > 1e-4, (i, errors)  # every Muon matrix is off the sphere between projections
        else:
            assert max(errors.values()) < 1e-6, (i, errors)
    # A loaded state (warm-up's restore, a resume) starts a new count: the next projection is 3 steps on.
    model.load_state_dict(state)
    assert model.unprojected_steps == 0
    step(model, optimizers, muon, 8)
    step(model, optimizers, muon, 9)
    assert min(sphere_errors(model).values()) > 1e-4
    step(model, optimizers, muon, 10)
    assert max(sphere_errors(model).values()) < 1e-6


def rotated(w, v):
    """Reference: each row w (unit) turned by the rotation matrix of the plane of w and v's tangent part t, by the
    angle |t| (float64, one row at a time)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i, (a, vi) in enumerate(zip(w.double(), v.double())):
        t = vi - (vi @ a) * a
        theta = t.norm()
        b = t / theta
        eye = torch.eye(len(a), dtype=torch.float64)
        rot = eye + theta.sin() * (torch.outer(b, a) - torch.outer(a, b)) + (theta.cos() - 1) * (
            torch.outer(a, a) + torch.outer(b, b))
        out[i] = rot @ a
    return out


def test_geodesic_muon_stays_on_the_sphere_and_equals_the_exact_rotation_of_its_tangent_step():
    # No projection in these steps (NGPT_PROJECT_EVERY=100): what keeps the norms is the update itself.
    lazy = {"NGPT_PROJECT_EVERY": "100", "NGPT_MATRIX_LR": "0.2"}
    geo, args = build(**lazy, NGPT_GEODESIC="1")
    flat, flat_args = build(**lazy)
    geo_opt, geo_muon = tg.build_optimizers(args, geo)  # tags the sphere matrices Muon gets with their axis
    muon_params = {id(p) for g in geo_muon.param_groups for p in g["params"]}
    tagged = {n: p for n, p in geo.named_parameters() if hasattr(p, "_geodesic_dim")}
    assert len(tagged) == 12 and all(id(p) in muon_params for p in tagged.values())
    w0 = {n: p.detach().clone() for n, p in geo.named_parameters()}
    flat_opt, flat_muon = tg.build_optimizers(flat_args, flat)
    step(geo, geo_opt, geo_muon, 1)
    step(flat, flat_opt, flat_muon, 1)  # the same weights, batch and momentum: Muon's plain step w0 - lr * u
    flat_w = dict(flat.named_parameters())
    for name, p in tagged.items():
        t = (lambda m: m) if p._geodesic_dim == 1 else (lambda m: m.T)  # rows of the d_model axis
        v = t(flat_w[name].detach() - w0[name])
        expected = rotated(t(w0[name]), v)
        assert (t(p.detach()).double() - expected).abs().max() < 1e-6, name
        # and it is not step-then-project: that differs at third order in the angle, visible at this step size
        projected = F.normalize(t(flat_w[name].detach()).double(), dim=-1)
        assert (projected - expected).abs().max() > 1e-5, name
    assert max(sphere_errors(geo).values()) < 1e-6
    for i in range(2, 6):
        step(geo, geo_opt, geo_muon, i)
        step(flat, flat_opt, flat_muon, i)
        assert max(sphere_errors(geo).values()) < 1e-6, i
    assert min(sphere_errors(flat).values()) > 1e-3  # the plain steps drift off the sphere without the projection


# -----------------------------
# Compiled and eager
# -----------------------------

@pytest.mark.slow  # torch.compile of the tiny model on CPU: ~30-60 s under load
def test_compiled_bf16_with_every_option_matches_eager_fp32_through_the_opaque_normalize():
    model, args = build(**ALL, NUM_LAYERS="4")
    assert args.ngpt_opaque_norm and model.norm is tg.sphere_normalize
    optimizers, muon = tg.build_optimizers(args, model)
    for i in range(2):  # trained a little: alphas, s_z and the matrices away from their init
        step(model, optimizers, muon, i)
    x, y = batch(7)
    with torch.no_grad():
        eager = model(x, y)
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        t0 = time.perf_counter()
        compiled_fp32 = compiled(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager_bf16 = model(x, y)
            compiled_bf16 = compiled(x, y)
    diffs = [(a - b).abs().max().item() for a, b in ((compiled_fp32, eager), (compiled_bf16, eager),
                                                     (compiled_bf16, eager_bf16))]
    print(f"compile+run: {time.perf_counter() - t0:.1f}s CPU time under load; max |per-token loss diff| compiled fp32 "
          f"- eager fp32, compiled bf16 - eager fp32, compiled bf16 - eager bf16: {diffs}")
    assert diffs[0] < 1e-4  # fp32: the same math
    assert diffs[1] < 5e-2 and diffs[2] < 5e-2
