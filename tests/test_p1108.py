"""STACK=1108 (MODEL=ngpt NGPT_PARAM=1108) against openai/parameter-golf #1108's own script (../shared/reference/pr1108,
its NGPT_ENABLED=1 NGPT_FULL=1 NGPT_WEIGHT_NORM=1 path): the same weights and tokens give the same loss, gradients,
optimizer step and dequantized weights."""

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REFERENCE, require_reference

CPU = torch.device("cpu")
# A small shape that still has every part: encoder and decoder skips (5 layers), XSA on the last 4, value embeddings
# on layers 2 and 3 (the record's 9 and 10 of 12), grouped KV heads, partial RoPE, BigramHash; windows over 1024 tokens,
# where #1108's RoPE is NTK-scaled (it assumes training at 1024).
SMALL = {"VOCAB_SIZE": "128", "NUM_LAYERS": "5", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
         "MLP_MULT": "3", "ROPE_DIMS": "8", "BIGRAM_BUCKETS": "96", "BIGRAM_DIM": "32", "TRAIN_SEQ_LEN": "1088",
         "TRAIN_BATCH_TOKENS": "8704"}
# Tables as wide as their targets (BIGRAM_DIM = MODEL_DIM, 4 x 32 KV = the value table's 128): #1108 projects neither.
UNPROJECTED = {"NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "4", "BIGRAM_DIM": "128",
               "TRAIN_SEQ_LEN": "96", "TRAIN_BATCH_TOKENS": "768"}


@pytest.fixture(scope="module")
def pr1108():
    """#1108's train_gpt.py as module reference_pr1108 (load_reference.py), its forward-pass weight normalization on
    (its main() sets it from NGPT_WEIGHT_NORM=1)."""
    require_reference(REFERENCE / "pr1108" / "train_gpt.py")
    sys.path.insert(0, str(REFERENCE))
    from load_reference import load

    module = load("pr1108")
    module.CastedLinear._ngpt_norm = True
    return module


def ours(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({"STACK": "1108", **SMALL, **env})


def reference_model(module, args: tg.Hyperparameters):
    """#1108's GPT built as its main() builds it, at our settings' shape."""
    layers = args.num_layers
    return module.GPT(
        vocab_size=args.vocab_size, num_layers=layers, model_dim=args.model_dim, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult, tie_embeddings=True, tied_embed_init_std=0.005,
        logit_softcap=30.0, rope_base=args.rope_base, qk_gain_init=1.5, bigram_vocab_size=args.bigram_buckets,
        bigram_dim=args.bigram_dim, xsa_last_n=4, rope_dims=args.rope_dims, ln_scale=True, ve_enabled=True,
        ve_dim=128, ve_layers=f"{layers - 3},{layers - 2}", vrl_enabled=False, ngpt=True, ngpt_full=True).float()


def their_name(name: str, ve_layers: list[int]) -> str:
    """Our parameter name -> #1108's."""
    for ours_, theirs in (("bigram.weight", "bigram.embed.weight"), ("bigram_proj", "bigram.proj"),
                          ("bigram_scale", "bigram.scale"), ("smear_gate", "smear.gate"), ("attn_alpha", "alpha_a"),
                          ("mlp_alpha", "alpha_m"), ("s_uv", "suv"), ("value_embed.weight", "ve_shared.embed.weight"),
                          ("value_embed_proj", "ve_shared.proj"), ("value_embed_scale", "ve_shared.scale")):
        name = name.replace(ours_, theirs)
    if name.endswith("attn.ve_gain"):
        return f"ve_layer_scales.{ve_layers.index(int(name.split('.')[1]))}"
    return name


def paired(args, module, seed=0):
    """Our model and #1108's with the same weights (theirs, randomized a little so every gain and mix matters)."""
    torch.manual_seed(seed)
    ref = reference_model(module, args)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = tg.build_model(args, CPU)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theirs[their_name(name, ref.ve_layer_indices)].reshape(p.shape))
    return model, ref


def batch(args, seed=1, rows=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (rows, args.train_seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_normalize_equals_its_l2normalizehp(pr1108):
    """Ours is x * rsqrt(sum x^2), theirs x / norm: forward within 2 ulp of fp32, the same analytic backward; in bf16
    both compute in fp32 and round once."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 2.5e-7), (torch.bfloat16, 8e-3)):
        x = (3 * torch.randn(64, 48)).to(dtype).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = tg.normalize_as_input(x), pr1108.L2NormalizeHP.apply(x2)
        assert y.dtype == y2.dtype == dtype and (y.float() - y2.float()).abs().max() <= tol
        dy = torch.randn(64, 48).to(dtype)
        y.backward(dy)
        y2.backward(dy)
        assert (x.grad.float() - x2.grad.float()).abs().max() <= 2 * tol * x2.grad.float().abs().max()


@pytest.fixture
def same_normalize(pr1108, monkeypatch):
    """#1108's model with our normalize in place of its L2NormalizeHP (their difference: the test above): the rest of
    the model is then compared without the ulp differences 80 normalizations compound."""
    monkeypatch.setattr(pr1108.L2NormalizeHP, "apply", staticmethod(tg.normalize_as_input))
    return pr1108


def float64_grads(args, same_normalize, monkeypatch):
    """Its model and ours on the same weights in float64, both cross-entropies from fp32-rounded logits, one backward
    each; the losses asserted equal (1e-8): (our model, its model)."""
    model, ref = paired(args, same_normalize)
    model.double(), ref.double()
    # Both round their logits to fp32 before the cross-entropy: from there on in float64, the same rounded logits give
    # the same gradients (a few round to either side of a boundary: the tolerances below).
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, *a, **k: cross_entropy(logits.double(), *a, **k))
    x, y = batch(args)
    loss, ref_loss = model(x, y).mean(), ref(x, y)
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-8 * ref_loss.item()
    return model, ref


def assert_grads_close(model, ref, tol) -> None:
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = theirs[their_name(name, ref.ve_layer_indices)].grad.reshape(p.shape)
        assert (p.grad - g).norm() <= tol * g.norm(), name


@pytest.mark.parametrize("env", [{}, UNPROJECTED], ids=["small", "unprojected_tables"])
def test_loss_and_every_gradient_equal_the_records(same_normalize, monkeypatch, env):
    """In float64 (our normalize keeps it; #1108's rounds to fp32, hence same_normalize), as the order of operations
    differs (its FA3 stand-in, our SDPA): its attention is sharp (logits up to head_dim^1.5 x a cosine) and fp32
    rounding alone moves some of this shape's gradients by 50% (docs/stack-1108.md)."""
    model, ref = float64_grads(ours(**env), same_normalize, monkeypatch)
    assert_grads_close(model, ref, 1e-3)  # at most 1.6e-4 here (a gain's); a wrong term: O(1)
    # Their parameters with a gradient are exactly ours (theirs also hold gains their nGPT path never reads).
    used = {n for n, p in ref.named_parameters() if p.grad is not None}
    assert used == {their_name(n, ref.ve_layer_indices) for n, _ in model.named_parameters()}


def test_fp32_loss_with_its_own_normalize_agrees(pr1108):
    args = ours()
    model, ref = paired(args, pr1108)
    x, y = batch(args)
    with torch.no_grad():
        assert abs(model(x, y).mean().item() - ref(x, y).item()) < 1e-4


def reference_optimizers(module, ref, args):
    """#1108's optimizers as its main() builds them (Muon on the blocks' matrices and the bigram and value-embedding
    projections; AdamW on the embeddings; AdamW on the rest, where alpha_a and alpha_m are listed twice)."""
    control = module.CONTROL_TENSOR_NAME_PATTERNS
    named = list(ref.blocks.named_parameters())
    matrix = [p for n, p in named if p.ndim == 2 and not any(c in n for c in control)]
    matrix += [ref.bigram.proj.weight, ref.ve_shared.proj.weight]
    scalar = [p for n, p in named if p.ndim < 2 or any(c in n for c in control)]
    scalar += [ref.skip_weights, ref.smear.gate, ref.logit_scale]
    scalar += [a for b in ref.blocks for a in (b.alpha_a, b.alpha_m)]
    scalar += [ref.bigram.scale, ref.ve_shared.scale, *ref.ve_layer_scales]
    tok = [ref.tok_emb.weight, ref.bigram.embed.weight, ref.ve_shared.embed.weight]
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=0.04)
    muon = module.Muon(matrix, lr=0.025, momentum=0.92, backend_steps=4, weight_decay=0.04)
    return [torch.optim.AdamW([{"params": tok, "lr": 0.035}], **adam), muon,
            torch.optim.AdamW([{"params": scalar, "lr": 0.025}], **adam)]


def test_one_optimizer_step_equals_the_records(pr1108):
    """The same weights and gradients (random, clipped at the global norm 0.3 by both), one step of each side's
    optimizers at step 0 (Muon momentum 0.92, full learning rates, weight decay 0.04 everywhere): Adam's steps equal
    to an ulp of the weight (the clip's norm is summed in another order: an ulp or two apart at some shapes, then
    Adam's steps are; with the same norm they are equal to the bit); Muon's to its bf16 Newton-Schulz (#1108's on
    every device, ours on CUDA: 2% here, against 19% with MUON_NS_COEFFS=quintic); alpha moves twice as far in
    #1108's, which lists it twice in its AdamW group."""
    args = ours()
    model, ref = paired(args, pr1108)
    theirs = dict(ref.named_parameters())
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        t = theirs[their_name(name, ref.ve_layer_indices)]
        t.grad = p.grad.clone().reshape(t.shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers, muon = tg.build_optimizers(args, model)
    muon_params = {p for g in muon.param_groups for p in g["params"]}
    assert len(muon_params) == 6 * args.num_layers + 2  # the blocks' matrices, the bigram and value projections
    for g in muon.param_groups:
        g["momentum"] = tg.muon_momentum(args, 0)
    norm = tg.step_optimizers(optimizers, muon, args.grad_clip_norm)
    assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3), rtol=1e-6, atol=0)
    for opt in reference_optimizers(pr1108, ref, args):
        opt.step()
    for name, p in model.named_parameters():
        t = theirs[their_name(name, ref.ve_layer_indices)].detach().reshape(p.shape)
        step, their_step = p.detach() - before[name], t - before[name]
        if name.endswith("_alpha"):
            assert torch.allclose(their_step, 2 * step, rtol=1e-3), name
        elif p in muon_params:
            assert (step - their_step).norm() <= 0.04 * their_step.norm(), name
        else:
            ulp = torch.finfo(p.dtype).eps * t.abs().maximum(before[name].abs())
            assert (step - their_step).abs().le(ulp).all(), name


def test_renormalized_dequantized_weights_equal_the_records_and_change_no_output(pr1108, monkeypatch):
    """#1108's dequantize_mixed_int6 (NGPT_QUANT_MODE=renorm) renormalizes the blocks' matrices' rows; ours does in
    after_load(). On the same int6 codes and scales both give the same weights, and the model's losses do not move:
    the forward normalizes those rows anyway."""
    monkeypatch.setenv("NGPT_QUANT_MODE", "renorm")
    monkeypatch.setenv("PRUNE_PCT", "0")
    # The record's width, so that every block matrix has over 65,536 values: #1108 keeps smaller ones fp16, unrenormed.
    args = ours(NUM_LAYERS="1", MODEL_DIM="512", NUM_HEADS="8", NUM_KV_HEADS="4", TRAIN_SEQ_LEN="64",
                TRAIN_BATCH_TOKENS="8192")
    model, ref = paired(args, pr1108)
    sd = ref.state_dict()
    result, meta = pr1108.mixed_quantize_int6(sd, {"mlp", "attn"})
    theirs = pr1108.dequantize_mixed_int6(result, meta, sd)
    plain = {}  # the same codes without the renormalization
    for name, info in meta.items():
        plain[name] = result[name] if isinstance(info, str) else \
            result[name + ".q"].float() * result[name + ".scale"].float().view(-1, *[1] * (sd[name].ndim - 1))
    x, y = batch(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(plain[their_name(name, ref.ve_layer_indices)].reshape(p.shape))
        model.double()  # in fp32 the ulps renormalizing moves are amplified by the sharp attention
        before = model(x, y)
        model.after_load()
        assert torch.allclose(model(x, y), before, rtol=1e-6, atol=0)  # the logits are rounded to fp32
    renormed = 0
    for name, p in model.named_parameters():
        their = theirs[their_name(name, ref.ve_layer_indices)].float().reshape(p.shape)
        assert torch.allclose(p.float(), their, rtol=0, atol=1e-6), name
        renormed += name.startswith("blocks.") and name.endswith(".weight")
    assert renormed == 6 * args.num_layers


def test_quantization_equals_its_mixed_quantize_int6(pr1108, monkeypatch):
    """STACK=1108's quantize_state_dict + dequantize_state_dict + after_load() against its mixed_quantize_int6 (GPTQ
    with its clip search, int8 embeddings per tensor, fp16 passthrough, 4% of the codes zeroed among the +-1 ones
    by its seed-42 draws) + dequantize_mixed_int6 (NGPT_QUANT_MODE=renorm), on the same state dict (in its order) and
    Hessians: every dequantized tensor equal to the bit."""
    monkeypatch.setenv("NGPT_QUANT_MODE", "renorm")
    for name in ("PRUNE_PCT", "PRUNE_MODE", "PRUNE_BEFORE_QUANT", "INT5_ALL", "INT5_MLP"):
        monkeypatch.delenv(name, raising=False)  # its record's defaults: 0.04, random
    # The record's width (every block matrix over 65,536 values), its vocabulary: the tables are quantized too.
    args = ours(NUM_LAYERS="1", MODEL_DIM="512", NUM_HEADS="8", NUM_KV_HEADS="4", MLP_MULT="1", VOCAB_SIZE="1024",
                BIGRAM_BUCKETS="1024", BIGRAM_DIM="128", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="8192")
    model, ref = paired(args, pr1108)
    g = torch.Generator().manual_seed(3)
    hessians, theirs_h, sd = {}, {}, ref.state_dict()
    for name, m in ref.named_modules():
        if name.startswith("blocks.") and isinstance(m, pr1108.CastedLinear):
            # rows of varied size, so the clip search picks different quantiles; a Hessian with act-order to do
            sd[f"{name}.weight"] *= torch.exp(3 * torch.rand(m.weight.size(0), 1, generator=g))
            x = torch.randn(2 * m.weight.size(1), m.weight.size(1), generator=g) * torch.rand(m.weight.size(1), generator=g)
            theirs_h[name] = hessians[f"{name}.weight"] = x.T @ x / x.size(0)
    ours_of = {their_name(n, ref.ve_layer_indices): n for n, _ in model.named_parameters()}
    sd = {n: t for n, t in sd.items() if n in ours_of}  # less what its model holds but never reads (its VE table here)
    ours_sd = {ours_of[n]: t for n, t in sd.items()}  # in its order: the prune's draws follow it
    result, meta = pr1108.mixed_quantize_int6(sd, {"mlp", "attn"}, hessians=theirs_h, model=ref)
    theirs = pr1108.dequantize_mixed_int6(result, meta, sd)
    qsd = tg.quantize_state_dict(ours_sd, args, hessians)
    with torch.no_grad():
        for name, t in tg.dequantize_state_dict(qsd).items():
            model.get_parameter(name).copy_(t.reshape(model.get_parameter(name).shape))
    model.after_load()
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[their_name(name, ref.ve_layer_indices)].reshape(p.shape)), name
    # Not vacuous: GPTQ on every block matrix, the two tables per tensor, ~4% of the codes zeroed by the draws.
    assert sum(f"{n}.weight.q" in result for n in theirs_h) == 6 and {"tok_emb.weight", "bigram.weight"} \
        <= {n for n, e in qsd.items() if "q" in e and e["scale"].unique().numel() == 1}
    codes = [e["q"] for e in qsd.values() if "q" in e]
    assert torch.cat([q.flatten() for q in codes]).eq(0).float().mean() > 0.04


def test_gptq_damps_after_sorting_as_its_gptq_quantize(pr1108):
    """Its gptq_quantize sorts the columns by the undamped Hessian diagonal, then damps: where damping makes two
    diagonal entries equal (here: 1 ulp apart just under 1.0, lifted into the next binade) the order, and so the
    codes, differ from damping first (GPTQ_DAMP_SORTED=0, the 1.0611 record's order)."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x = torch.randn(4 * n, n, generator=g)
    H = x.T @ x / x.size(0)
    H.diagonal().copy_((1 - torch.arange(n) * 2.0 ** -24)[torch.randperm(n, generator=g)])
    w = 3 * torch.randn(64, n, generator=g)
    q, s = pr1108.gptq_quantize(w, H)
    grid = tg.clip_search_scales(w, 31, fp16=False)
    assert torch.equal(grid.half(), s)
    assert torch.equal(tg.gptq(w, grid, 31, H, 0.01, 128, fp64=False, damp_sorted=True).to(torch.int8), q)
    assert not torch.equal(tg.gptq(w, grid, 31, H, 0.01, 128, fp64=False).to(torch.int8), q)


@pytest.mark.slow
def test_loss_and_every_gradient_equal_the_records_at_its_shape(same_normalize, monkeypatch):
    """The record's own shape (12 layers, 512 wide, vocabulary 1024, BigramHash 8192, 2048-token windows)."""
    model, ref = float64_grads(tg.Hyperparameters({"STACK": "1108"}), same_normalize, monkeypatch)
    # At most 1e-2 (the value-residual gates': small sums of terms that cancel), 3e-3 elsewhere; a wrong term: O(1)
    assert_grads_close(model, ref, 3e-2)


def test_sliding_window_scores_equal_the_records_per_target(same_normalize, monkeypatch):
    """Its eval_val_sliding and our sliding path, windows of 64 every 16 on 300 tokens: the per-target losses its
    windows compute (read off its cross-entropy calls) equal ours for every target it scores in a full window; its
    windows past the last full one score the stream's last 16 targets again (each time with less context), ours once."""
    monkeypatch.setenv("NO_COMPILE", "1")
    args = ours(TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", EVAL_STRIDE="16", VAL_BATCH_SIZE="8192")
    model, ref = paired(args, same_normalize)
    model.double(), ref.double()
    tokens = torch.randint(0, args.vocab_size, (300,), generator=torch.Generator().manual_seed(5))
    base = torch.ones(args.vocab_size, dtype=torch.int16)
    luts = (base, torch.zeros(args.vocab_size, dtype=torch.bool), torch.zeros(args.vocab_size, dtype=torch.bool))
    ours_losses = torch.zeros(tokens.numel() - 1)
    tg.evaluate(args, model, tokens, luts, 0, 1, CPU, seq_len=64, stride=16, losses=ours_losses)
    nlls, cross_entropy = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: nlls.append(cross_entropy(*a, **k)) or nlls[-1])
    same_normalize.eval_val_sliding(SimpleNamespace(train_seq_len=64), ref, 0, 1, CPU, tokens, *luts,
                                    stride=16, batch_seqs=32)
    scores = torch.cat(nlls).view(-1, 64)
    total, checked = tokens.numel() - 1, 0
    for w, ws in enumerate(range(0, total, 16)):
        if ws + 64 <= total:  # a full window: it scores targets ws + s .. ws + 63
            s = 0 if ws == 0 else 64 - 16
            assert torch.allclose(scores[w, s:].double(), ours_losses[ws + s : ws + 64].double(), atol=1e-5), ws
            checked += 64 - s
    assert checked == 288  # the targets of its full windows; the last 11 only its shorter tail windows score


def test_gptq_calibration_reads_every_matrix_of_the_1108_model():
    """collect_hessians records the inputs of F.linear on a parameter: its copy of NGPT1108 multiplies the stored
    matrices (rows normalized once), so every one gets a Hessian, and that copy computes the same losses."""
    args = ours(TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024")
    torch.manual_seed(0)
    model = tg.build_model(args, CPU).double()
    x, y = batch(args)
    hessians = tg.collect_hessians(model, [(x, y)])
    matrices = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, tg.SphereRowsLinear)}
    assert len(matrices) == 6 * args.num_layers + 2 and matrices | {"tok_emb.weight"} <= set(hessians)
    copy_ = copy.deepcopy(model)
    copy_.calibration_copy()
    with torch.no_grad():
        assert torch.allclose(copy_(x, y), model(x, y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("env", [{"ATTN_GATE_DIMS": "12"}, {"QAT_START": "0.5"}, {"TIE_EMBEDDINGS": "0"},
                                 {"NGPT_GEODESIC": "1"}, {"NGPT_PROJECT_EVERY": "4"}])
def test_1108_refuses_what_it_does_not_compute(env):
    with pytest.raises(tg.ConfigError, match="NGPT_PARAM=1108 has no"):
        tg.build_model(ours(**env), CPU)
