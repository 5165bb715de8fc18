"""The 1.0611 record's (#1855) quantization reproduced by ours: GPTQ int6 / int7 with its clip sigmas, the int8
attention gate, asymmetric int2/int4 LQER on the top-3 tensors, its fp16 passthrough; on the same weights and
Hessians (random SPD ones and real ones from a tiny forward of its model), compared with its own functions."""

import pytest
import torch

import train_gpt as tg
from conftest import pr1855_model, pr1855_settings

# Our settings that quantize as the record's reproduce command does (docs/data.md "Reproducing").
RECIPE_QUANT = {
    "QUANT": "int6", "QUANT_EMBED": "int7",  # MATRIX_BITS=6, EMBED_BITS=7
    "SDCLIP_K_ATTN": "13.0", "SDCLIP_K_MLP": "11.5", "SDCLIP_K_EMBED": "14.0",  # ATTN_/MLP_/EMBED_CLIP_SIGMAS
    "GPTQ": "1", "GPTQ_EMBED": "1", "GPTQ_DAMP": "0.01", "GPTQ_BLOCK": "128",
    "GPTQ_FP64": "0",  # its Hessian inverse is float32
    "GPTQ_CALIB_BATCHES": "2",  # its 16 batches of 786,432 / 8 tokens (rank 0's) = 2 x TRAIN_BATCH_TOKENS
    "QUANT_GATE": "int8",  # GATED_ATTN_QUANT_GATE=1
    "QUANT_CONTROL": "fp16",  # its passthrough stores every float tensor of <= 65,536 values in fp16
    "LOWRANK_RANK": "4", "LOWRANK_TENSORS": "3", "LOWRANK_GROUP": "64",  # LQER_RANK, LQER_TOP_K, LQER_ASYM_GROUP
    "COMPRESSOR": "zpaq",  # the ZPAQ of its per-group lrzip, in one stream and without its row sort (README)
    "AWQ_GROUPS": "0",  # #1855 has no AWQ-lite (tests/test_frontier_eval.py compares #2014's)
}
# The record's settings for the same (the reproduce command's; its LQER_FACTOR_BITS=4 is for the symmetric
# packing, which its asymmetric one replaces whenever the group divides B).
RECORD_QUANT = dict(matrix_bits=6, embed_bits=7, matrix_clip_sigmas=12.85, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5,
                    embed_clip_sigmas=14.0, gated_attn_quant_gate=True, lqer_enabled=True, lqer_asym_enabled=True,
                    lqer_rank=4, lqer_top_k=3, lqer_factor_bits=4, lqer_asym_group=64)


def recipe_args(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({**RECIPE_QUANT, **env})


def spd(n: int, gen: torch.Generator, dead: int = 0) -> torch.Tensor:
    """A random Hessian of calibration-like inputs: correlated features of unequal scale, the first `dead` inputs
    never firing."""
    x = torch.randn(2 * n, n, generator=gen) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n ** 0.5)
    x = x * torch.rand(n, generator=gen).add(0.1)
    x[:, :dead] = 0
    return x.T @ x / x.size(0)


def trained_like(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of unequal spread with heavy tails (Student-t, 4 dof) and rare outliers, so that the clip sigmas bite."""
    t = torch.randn(rows, cols, generator=gen) / torch.sqrt(torch.distributions.Chi2(4.0).sample((rows, cols)) / 4)
    t = torch.where(torch.rand(rows, cols, generator=gen) < 1e-3, 20 * t, t)
    return 0.02 * t * torch.rand(rows, 1, generator=gen).add(0.5)


# -----------------------------
# Each part against the record's function
# -----------------------------

@pytest.mark.parametrize("rows,cols,bits,k,dead", [(96, 200, 6, 13.0, 3), (256, 512, 6, 11.5, 0), (300, 384, 7, 14.0, 1)])
def test_gptq_codes_and_scales_equal_the_records(pr1855, rows, cols, bits, k, dead):
    gen = torch.Generator().manual_seed(rows)
    torch.manual_seed(rows)
    w, H = trained_like(rows, cols, gen), spd(cols, gen, dead)
    qmax = 2 ** (bits - 1) - 1
    q_ref, s_ref = pr1855.gptq_quantize_weight(w, H, clip_sigmas=k, clip_range=qmax)
    scale = tg.sdclip_scales(w, qmax, k)
    q = tg.gptq(w, scale, qmax, H, damp=0.01, block=128, fp64=False)
    assert torch.equal(scale.half(), s_ref)
    assert torch.equal(q.to(torch.int8), q_ref)
    assert q_ref.abs().max() == qmax  # the clip is reached: the grid's end is part of what is compared
    # Our default inverts the Hessian in float64: at most a few codes in a thousand differ, each by one step.
    q64 = tg.gptq(w, scale, qmax, H, damp=0.01, block=128)
    assert (q64 - q_ref.float()).abs().max() <= 1 and (q64 != q_ref.float()).float().mean() < 1e-3


def test_gate_int8_rows_equal_the_records_on_our_attention_gate(pr1855):
    torch.manual_seed(0)
    env = {"VOCAB_SIZE": "256", "NUM_LAYERS": "2", "MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "ATTN_GATE_DIMS": "12", "PHASED_TTT_ENABLED": "0"}
    args = recipe_args(**env)
    model = tg.build_model(args, torch.device("cpu"))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    x = torch.randint(0, 256, (2, 32))
    hessians = tg.collect_hessians(model, [(x, x)])
    gates = [n for n in sd if "attn_gate" in n]
    assert gates and all(n in hessians for n in gates)  # a Hessian exists, but the gate is rounded as the record's
    qsd = tg.quantize_state_dict(sd, args, hessians)
    back = tg.dequantize_state_dict(qsd)
    for name in gates:
        q_ref, s_ref = pr1855._quantize_gate_int8_row(sd[name])
        assert torch.equal(qsd[name]["q"], q_ref) and torch.equal(qsd[name]["scale"], s_ref)
        assert torch.equal(back[name], q_ref.float() * s_ref.float()[:, None])
    default = tg.quantize_state_dict(sd, tg.Hyperparameters({**env, "QUANT_GATE": "float", "QUANT_CONTROL": "fp32"}),
                                     hessians)  # QUANT_GATE=float: fp32, exact
    assert all(torch.equal(default[n]["w"], sd[n]) for n in gates)


def test_asymmetric_lowrank_packing_equals_the_records(pr1855):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(384, 4, generator=gen) * 0.03, torch.randn(4, 1536, generator=gen) * 0.05
    qa, sa, qb, sb = pr1855._lqer_pack_asym(a, b, 64)
    ours = tg.pack_lowrank(a, b, 64)
    assert torch.equal(ours["lr_a"], qa) and torch.equal(ours["lr_sa"].reshape(()), sa)
    assert torch.equal(ours["lr_b"], qb) and torch.equal(ours["lr_sb"].flatten(), sb)
    assert -2 <= qa.min() and qa.max() <= 1 and qb.min() == -8 and qb.max() == 7
    correction = (qa.float() * float(sa)) @ (qb.reshape(-1, 64).float() * sb.float()[:, None]).reshape(qb.shape)
    assert torch.equal(tg.lowrank_term(ours), correction)
    assert set(tg.pack_lowrank(a, b[:, :100], 64)) == {"lr_a", "lr_b"}  # 64 does not divide B: fp16 factors


# -----------------------------
# The whole quantizer: ours on RECIPE_QUANT against gptq_mixed_quantize + dequantize_mixed
# -----------------------------

def assert_same_quantization(pr1855, sd: dict, hessians: dict) -> dict:
    """Quantize sd both ways and compare every stored tensor and every dequantized weight; returns ours."""
    result, meta = pr1855.gptq_mixed_quantize(sd, hessians, pr1855_settings(pr1855, **RECORD_QUANT))
    args = recipe_args()
    qsd = tg.quantize_state_dict(sd, args, hessians)
    for name, e in qsd.items():
        if meta[name].startswith("gptq"):
            assert torch.equal(e["q"], result[name + ".q"]) and torch.equal(e["scale"], result[name + ".scale"]), name
        elif meta[name] == "gate_int8_row":
            assert torch.equal(e["q"], result[name + ".gq"]) and torch.equal(e["scale"], result[name + ".gs"]), name
        else:
            assert torch.equal(e["w"], result[name]), name
    lqer = {n for n, m in meta.items() if m.endswith("+lqer_asym")}
    assert len(lqer) == 3 and lqer == {n for n, e in qsd.items() if "lr_sa" in e}  # the same top-3 tensors
    for name in lqer:
        e = qsd[name]
        assert torch.equal(e["lr_a"], result[name + ".lqA_a"]) and torch.equal(e["lr_b"], result[name + ".lqB_a"])
        assert torch.equal(e["lr_sa"].reshape(()), result[name + ".lqAs_a"])
        assert torch.equal(e["lr_sb"].flatten(), result[name + ".lqBs_a"])
    ref = pr1855.dequantize_mixed(result, meta, sd)
    ours = tg.dequantize_state_dict(qsd)
    assert ref.keys() == ours.keys() and all(torch.equal(ours[n], ref[n]) for n in ref)
    qsd_back, _ = tg.unpack_artifact(tg.pack_artifact(qsd, args.artifact_settings(), "zlib"))
    back = tg.dequantize_state_dict(qsd_back)
    assert all(torch.equal(back[n], ref[n]) for n in ref)  # and so after our container's round trip
    return qsd


def test_recipe_quantization_equals_the_records_on_random_hessians(pr1855):
    """A state dict under the record's names, every matrix over its 65,536-value passthrough limit."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d, kv, hidden, vocab = 384, 192, 1536, 512
    sd = {"tok_emb.weight": trained_like(vocab, d, gen), "skip_weights": torch.rand(1, d, generator=gen)}
    hessians = {"tok_emb.weight": spd(d, gen)}
    for i in range(2):
        shapes = {"attn.c_q": (d, d), "attn.c_k": (kv, d), "attn.c_v": (kv, d), "attn.proj": (d, d),
                  "mlp.fc": (hidden, d), "mlp.proj": (d, hidden)}
        for part, (rows, cols) in shapes.items():
            sd[f"blocks.{i}.{part}.weight"] = trained_like(rows, cols, gen)
        sd[f"blocks.{i}.attn.attn_gate_w"] = 0.1 * torch.randn(8, 12, generator=gen)
        sd[f"blocks.{i}.attn_scale"] = torch.rand(d, generator=gen)
        sd[f"blocks.{i}.attn.q_gain"] = torch.rand(8, generator=gen) + 4
        hx, hh = spd(d, gen, dead=i), spd(hidden, gen)
        hessians.update({f"blocks.{i}.attn.{p}.weight": hx for p in ("c_q", "c_k", "c_v", "proj")})
        hessians.update({f"blocks.{i}.mlp.fc.weight": hx, f"blocks.{i}.mlp.proj.weight": hh})
    assert_same_quantization(pr1855, sd, hessians)


class RandomTokens:
    """The record's calibration loader, on random tokens without a BOS: its calibration forward lets attention cross
    documents, ours (DOC_ATTENTION=1) does not."""

    def __init__(self, vocab: int, batch: int, seq: int):
        self.vocab, self.shape = vocab, (batch, seq)

    def next_batch(self, global_tokens, grad_accum_steps):
        x = torch.randint(tg.BOS_ID + 1, self.vocab, self.shape)
        return x, x


def test_recipe_quantization_equals_the_records_on_its_models_hessians(pr1855):
    """Real Hessians: the record's collect_hessians on its own model (2 layers at its width, 1024-token vocab, sparse
    gate on) over random tokens; its weights off their init (zero-initialized projections would have no spread)."""
    torch.manual_seed(0)
    h = pr1855_settings(pr1855, num_layers=2, vocab_size=1024, sparse_attn_gate_enabled=True, gate_window=12,
                        smear_gate_enabled=True, **RECORD_QUANT)
    model = pr1855_model(pr1855, h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hessians = pr1855.collect_hessians(model, RandomTokens(h.vocab_size, 2, 128), h, torch.device("cpu"),
                                       n_calibration_batches=2)
    sd = pr1855._unbank_state_dict(model.state_dict(), h.num_layers)
    assert {n for n, t in sd.items() if t.numel() > 65536} == set(hessians)
    qsd = assert_same_quantization(pr1855, sd, hessians)
    assert sum("attn_gate_w" in n and "q" in e for n, e in qsd.items()) == 2


# -----------------------------
# COMPRESSOR=zpaq
# -----------------------------

def test_zpaq_round_trips_and_beats_every_other_compressor_on_int6_codes():
    """ZPAQ (the back end of the record's lrzip, from pip): on GPTQ-like int6 codes it lands under the smallest of
    the others (on a full-size stand-in: 133,768 bytes under brotli; docs/export.md "Against the 1.0611 record")."""
    torch.manual_seed(0)
    sd = {f"blocks.{i}.mlp.fc.weight": 0.02 * torch.randn(320, 256) for i in range(4)}  # over 65,536: quantized
    qsd = tg.quantize_state_dict(sd, recipe_args())
    blob = tg.pack_artifact(qsd, {"SEED": 1}, "zpaq")
    back, settings = tg.unpack_artifact(blob)
    assert tg.artifact_compressor(blob) == "zpaq" and settings == {"SEED": 1}
    assert all(torch.equal(back[n][p], e[p]) for n, e in qsd.items() for p in e if p != "dtype")
    best = tg.pack_artifact(qsd, {}, "best")
    assert tg.artifact_compressor(best) != "zpaq" and len(blob) < len(best)


def test_our_recipe_model_quantizes_as_the_record_on_the_same_weights(pr1855):
    """Our GPT with the record's model settings (tests/test_recipe_model.py) holding its weights: our Hessians equal
    its collect_hessians' (times its batch count) to float32 rounding, and on its Hessians our quantizer gives every
    tensor of ours the record's treatment of its counterpart, bit for bit (gates, smear gate and lambdas included)."""
    from test_recipe_model import pair

    shape = {"NUM_LAYERS": "2", "MODEL_DIM": "384", "NUM_HEADS": "8", "NUM_KV_HEADS": "4", "VOCAB_SIZE": "512",
             "XSA_LAST_N": "2", "RECUR_LAYERS": "", "PARALLEL_LANES_FROM": "1"}
    record, ours = pair(pr1855, shape, {"num_layers": 2, "model_dim": 384, "vocab_size": 512, "xsa_last_n": 2,
                                        "num_loops": 0, "parallel_start_layer": 1, **RECORD_QUANT})
    h = pr1855_settings(pr1855, **RECORD_QUANT)
    torch.manual_seed(3)
    loader = RandomTokens(512, 2, 64)
    batches = [loader.next_batch(0, 1) for _ in range(2)]
    loader.next_batch = lambda *_: batches.pop(0)
    theirs = pr1855.collect_hessians(record, loader, h, torch.device("cpu"), n_calibration_batches=2)
    torch.manual_seed(3)
    mine = tg.collect_hessians(ours, [RandomTokens(512, 2, 64).next_batch(0, 1) for _ in range(2)])
    for name, H in theirs.items():
        assert torch.allclose(mine[name] / 2, H, rtol=1e-4, atol=1e-4 * H.abs().max().item()), name
    sd = record.state_dict()
    sd_record = pr1855._unbank_state_dict(sd, 2)
    result, meta = pr1855.gptq_mixed_quantize(sd_record, theirs, h)
    qsd = tg.quantize_state_dict(ours.state_dict(), recipe_args(), theirs)
    ref = pr1855.dequantize_mixed(result, meta, sd_record)
    back = tg.dequantize_state_dict(qsd)
    renamed = {n.replace("attn.attn_gate_w", "attn.attn_gate").replace("smear_gate.weight", "smear_gate"): t
               for n, t in ref.items()}
    assert set(back) - {"recur_active"} == set(renamed)
    assert all(torch.equal(back[n], renamed[n].to(back[n].dtype)) for n in renamed)
