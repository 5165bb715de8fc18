"""#2014's evaluation and export levers (openai/parameter-golf #2014, ../shared/reference/pr2014) against its own
functions on the CPU: AWQ-lite and the float/gate rule of its gptq_mixed_quantize + dequantize_mixed, and its
eval_val_ttt_phased with the loop on (adapters per pass), the no_qv mask, its local LR multiplier, the short-document
chunk schedule and one phase; the score-first prefix probe on the default evaluation path."""

import copy

import pytest
import torch

import test_recipe_ttt as rt
import train_gpt as tg
from conftest import CPU, pr1855_model, pr1855_settings
from test_recipe_model import RECIPE, ours_from_record
from test_recipe_model import RECORD as RECIPE_RECORD
from test_recipe_quant import RECIPE_QUANT, RECORD_QUANT, spd, trained_like

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# -----------------------------
# Export: AWQ-lite, what stays float, the gate's range
# -----------------------------

def record_state(d: int, kv: int, hidden: int, vocab: int, gates, gen, head_boost: float = 30):
    """A state dict under #2014's names, its Hessians and activation RMS (as its collect_hessians: sqrt(sum x^2 /
    rows)), and ours (the same Hessians, with `rows` such that sqrt(diag H / rows) is that RMS)."""
    sd = {"tok_emb.weight": trained_like(vocab, d, gen), "skip_weights": torch.rand(1, d, generator=gen)}
    hessians = {"tok_emb.weight": spd(d, gen)}
    for i, gate in enumerate(gates):
        shapes = {"attn.c_q": (d, d), "attn.c_k": (kv, d), "attn.c_v": (kv, d), "attn.proj": (d, d),
                  "mlp.fc": (hidden, d), "mlp.proj": (d, hidden)}
        for part, shape in shapes.items():
            sd[f"blocks.{i}.{part}.weight"] = trained_like(*shape, gen)
        sd[f"blocks.{i}.attn.attn_gate_w"] = 0.1 * torch.randn(*gate, generator=gen)
        sd[f"blocks.{i}.attn_scale"] = torch.rand(d, generator=gen)
        hx, hh = spd(d, gen, dead=i), spd(hidden, gen)
        hessians.update({f"blocks.{i}.attn.{p}.weight": hx for p in ("c_q", "c_k", "c_v", "proj")})
        hessians.update({f"blocks.{i}.mlp.fc.weight": hx, f"blocks.{i}.mlp.proj.weight": hh})
    hessians = {n: H for n, H in hessians.items() if sd[n].numel() > 65536}  # its Hessians: the GPTQ matrices'
    rows = torch.tensor(1000.0, dtype=torch.float64)
    act = {n: (H.diagonal().float() / rows.float()).sqrt() for n, H in hessians.items()}
    act["tok_emb.weight"] = act["tok_emb.weight"] * head_boost  # the head's input: the embedding's groups stand out
    ours = {**hessians, **{f"{n}:rows": rows for n in hessians}}
    ours["tok_emb.weight:rows"] = rows / head_boost ** 2  # head_boost x the RMS, as above
    return sd, hessians, act, ours


# d=256 with 2 KV heads: c_q, c_k, c_v, proj (<= 65,536 values) stay fp16; a gate of 16 values (under 32) and one of
# 10,240 (over 8,192) stay fp16, (4, 12) is rounded to int8. d=384: every matrix quantized, 3 AWQ groups. d=192 with
# the head's RMS not boosted: its 3 groups go to several block matrices (the ranking across tensors).
@pytest.mark.parametrize("d,heads,kv_heads,gates,groups,head_boost", [(256, 4, 2, [(4, 12), (4, 4), (40, 256)], 1, 30),
                                                                      (384, 8, 4, [(8, 12), (8, 384)], 3, 30),
                                                                      (192, 6, 2, [(6, 12), (6, 192)], 3, 1)])
def test_awq_lite_and_the_float_rule_equal_the_records(pr2014, d, heads, kv_heads, gates, groups, head_boost):
    gen = torch.Generator().manual_seed(d)
    torch.manual_seed(d)
    sd, hessians, act, ours_h = record_state(d, d // heads * kv_heads, 4 * d, 512, gates, gen, head_boost)
    h = pr1855_settings(pr2014, **RECORD_QUANT, awq_lite_enabled=True, awq_lite_bits=8, awq_lite_group_size=64,
                        awq_lite_group_top_k=groups)
    result, meta = pr2014.gptq_mixed_quantize(sd, hessians, act, h)
    args = tg.Hyperparameters({**RECIPE_QUANT, "AWQ_GROUPS": str(groups)})
    qsd = tg.quantize_state_dict(sd, args, ours_h)
    awq = {n for n, m in meta.items() if "awqgrp" in m}
    assert awq == {n for n, e in qsd.items() if "awq_start" in e}
    assert ("tok_emb.weight" in awq) == (head_boost > 1) and len(awq) >= (1 if head_boost > 1 else 2)
    for name in awq:
        assert torch.equal(qsd[name]["awq_start"], result[name + ".awqg_start"])
        assert torch.equal(qsd[name]["awq_scale"], result[name + ".awqg_s_hi"])
        assert torch.equal(qsd[name]["q"], result[name + ".q"]), name  # the same codes, GPTQ's error feedback included
    kept = {n for n, m in meta.items() if m.startswith("passthrough")}
    assert kept == {n for n, e in qsd.items() if "w" in e}
    assert {n for n, m in meta.items() if m == "gate_int8_row"} == {n for n in qsd if "attn_gate" in n and "q" in qsd[n]}
    if d == 256:
        assert {"blocks.0.attn.c_k.weight", "blocks.0.attn.c_q.weight", "blocks.2.attn.attn_gate_w"} <= kept
    ref = pr2014.dequantize_mixed(result, meta, sd)
    back, _ = tg.unpack_artifact(tg.pack_artifact(qsd, args.artifact_settings(), "zlib"))
    for deq in (tg.dequantize_state_dict(qsd), tg.dequantize_state_dict(back)):
        assert deq.keys() == ref.keys() and all(torch.equal(deq[n], ref[n]) for n in ref)


def test_awq_lite_reads_activation_rms_from_our_hessians():
    """collect_hessians' row counts: sqrt(diag H / rows) is each input column's RMS, the loop's passes included."""
    args = tg.Hyperparameters({**RECIPE, "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                               "VOCAB_SIZE": "128", "ROPE_DIMS": "8", "XSA_LAST_N": "4", "RECUR_LAYERS": "1-2",
                               "PARALLEL_LANES_FROM": "3", "RECUR_START_FRAC": "0", "TRAIN_SEQ_LEN": "64"})
    model = tg.build_model(args, CPU)
    x = torch.randint(2, 128, (2, 64))
    seen = []
    model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].reshape(-1, inp[0].size(-1))))
    hessians = tg.collect_hessians(model, [(x, x)])
    inputs = torch.cat(seen)
    assert len(seen) == 3 and hessians["blocks.1.mlp.proj.weight:rows"] == inputs.size(0) == 3 * 128
    assert hessians["blocks.0.mlp.proj.weight:rows"] == 128
    rms = (hessians["blocks.1.mlp.proj.weight"].diagonal() / hessians["blocks.1.mlp.proj.weight:rows"]).sqrt()
    assert torch.allclose(rms.float(), inputs.square().mean(0).sqrt(), rtol=1e-4)


# -----------------------------
# Phased TTT: #2014's eval_val_ttt_phased with the loop on
# -----------------------------

LAYERS, SHORT = 4, "24:2,34:4"  # layers 1-2 run 3x: 8 positions; batches of <= 24 tokens: chunks of 2, <= 34: 4
OURS = {**rt.OURS, **RECIPE, **{k: rt.OURS[k] for k in ("VOCAB_SIZE", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS",
                                                          "ROPE_DIMS", "COMPILE", "EVAL_MAX_SECONDS")},
        "NUM_LAYERS": str(LAYERS), "XSA_LAST_N": str(LAYERS), "TRAIN_SEQ_LEN": str(rt.SEQ), "EVAL_SEQ_LEN": str(rt.SEQ),
        "RECUR_LAYERS": "1-2", "RECUR_START_FRAC": "0", "PARALLEL_LANES_FROM": "3", "SMEAR_GATE_DIMS": "4",
        "ATTN_GATE_DIMS": "4", "LORA_TARGETS": "*.c_k,*.attn,*.mlp,tied_head,lm_head", "LORA_LR": str(0.01 * 0.75),
        "LORA_SHORT_CHUNKS": SHORT, "PHASED_TTT_NUM_PHASES": "1"}
RECORD = {**rt.RECORD, **RECIPE_RECORD, "num_layers": LAYERS, "xsa_last_n": LAYERS, "num_loops": 2, "loop_start": 1,
          "loop_end": 2, "parallel_start_layer": 3, "gate_window": 4, "ttt_q_lora": False, "ttt_v_lora": False,
          "ttt_local_lr_mult": 0.75, "ttt_short_score_first_enabled": True, "ttt_short_score_first_steps": SHORT,
          "phased_ttt_num_phases": 1}


def record_and_ours(pr):
    h = pr1855_settings(pr, **RECORD)
    torch.manual_seed(0)
    ref = pr1855_model(pr, h)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    ref.looping_active = True
    args = tg.Hyperparameters(OURS)
    ours = tg.build_model(args, CPU)
    missing, _ = ours.load_state_dict(ours_from_record(ref.state_dict(), LAYERS), strict=False)
    assert set(missing) <= {"recur_active"}, missing
    ours.set_recurrence(True)
    assert ours.orders[1] == ref.encoder_indices + ref.decoder_indices
    return h, ref, args, ours


def our_draws(args, model, seed) -> dict[str, torch.Tensor]:
    """Our adapters' initial A by module name, the loop's later passes (pass_blocks.<layer>_<pass>) included."""
    m = copy.deepcopy(model)
    lora = tg.LoRA(m, args.lora_targets, args.lora_rank, 1, seed, args.lora_scale)
    names = {mod: name for name, mod in m.named_modules()}
    return {names[mod]: a[0] for (mod, *_), a in zip(tg.adapter_sizes(m, args.lora_targets), lora.A_init)}


def record_loras(order):
    """The record's adapters (one per position of its run order) -> our modules of that layer's pass."""
    def pairs(lora):
        for s, i in enumerate(order):
            k = order[:s].count(i)
            prefix = f"pass_blocks.{i}_{k}" if k else f"blocks.{i}"
            yield from ((f"{prefix}.attn.c_k", lora.k_loras[s]), (f"{prefix}.attn", lora.o_loras[s]),
                        (f"{prefix}.mlp", lora.mlp_loras[s]))
        yield "tied_head", lora.lm_head_lora
    return pairs


def test_phased_ttt_with_the_loop_equals_the_records(pr2014, monkeypatch, capsys):
    h, ref, args, ours = record_and_ours(pr2014)
    tokens, byte_luts = rt.val_stream(), rt.luts()
    draws = [our_draws(args, ours, args.seed + p) for p in (0, 0, 1)]
    assert len(draws[0]) == 8 * 3 + 1  # 8 positions x (K, O, MLP) + the head: no Q or V adapters
    (vl, vb, stats), losses, scores, _ = rt.run_ours(args, ours, tokens, byte_luts, monkeypatch)
    monkeypatch.setattr(rt, "record_loras", record_loras(ours.orders[1]))
    rvl, rvb, rscores, rstreams, made = rt.run_record(pr2014, h, ref, tokens, byte_luts, draws, monkeypatch,
                                                      f"frontier_ttt_{id(h)}")
    assert made == [2, 1, 2] and stats["phases"] == 1 and len(rstreams) == 1
    # The schedule's chunks: the same rounds, scoring the same targets (2, 4 and 8 at a time) with the same losses.
    assert len(scores) == len(rscores) and {s.numel() for s in scores} >= {2, 4, 8}
    diff = max((s - r).abs().max().item() for s, r in zip(scores, rscores))
    with capsys.disabled():
        print(f"\nphased_ttt (loop on, no_qv, short chunks) vs #2014: {len(scores)} rounds, max |loss diff| {diff:.2e}, "
              f"val_bpb {vb:.8f} vs {rvb:.8f}")
    assert diff < 2e-5
    assert vl == pytest.approx(rvl, abs=2e-6) and vb == pytest.approx(rvb, abs=2e-6)
    # Shared adapters across the loop's passes (what we had) give other losses: the per-pass sets matter here.
    monkeypatch.setattr(tg.GPT, "split_passes", lambda self: None)
    shared = torch.zeros_like(losses)
    tg.evaluate_phased_ttt(args, ours, tokens, byte_luts, 0, 1, CPU, losses=shared)
    assert (shared - losses).abs().max() > 1e-4


# 23: a short document, scored in chunks of 2; 70: taken first, before the phase (slow: the same probe at 8 chunks).
@pytest.mark.parametrize("length", [23, pytest.param(70, marks=pytest.mark.slow)])
def test_the_default_evaluation_path_is_score_first_with_the_loop_and_short_chunks(length, monkeypatch):
    # tests/test_recipe_ttt.py's prefix probe on phased TTT under OURS (#2014's path at the tiny shape): changing
    # token p changes no loss scored before target p - 1 was.
    args = tg.Hyperparameters(OURS)
    assert [n for n, p in tg.EVAL_PATHS.items() if p.adapts and p.enabled(tg.Hyperparameters({}))] == ["phased_ttt"]
    torch.manual_seed(0)
    model = tg.build_model(args, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.set_recurrence(True)
    tokens = rt.val_stream()
    doc = sum(rt.DOC_LENGTHS[: rt.DOC_LENGTHS.index(length)])
    p = doc + length // 2
    changed = tokens.clone()
    changed[p] = 2 + (tokens[p] - 1) % (rt.VOCAB - 2)
    base, rounds = rt.scoring_rounds(args, model, tokens, monkeypatch)
    other, _ = rt.scoring_rounds(args, model, changed, monkeypatch)
    target = torch.arange(rounds.numel())
    before = (rounds < rounds[p - 1]) | ((rounds == rounds[p - 1]) & (target < p - 1))
    assert (rounds >= 0).all() and torch.equal(base[before], other[before])
    assert (base[p - 1] - other[p - 1]).abs() > 0
