"""Our GPT computes what the 1.0611 record's GPT (openai/parameter-golf #1855, ../shared/reference/pr1855) computes:
with RECIPE's settings, the same parameter count, and on the record's weights mapped by name the same loss and
gradients in float32 on the CPU, with depth recurrence off and on, across document boundaries and without."""

import re
import sys

import pytest
import torch

import train_gpt as tg
from conftest import CPU, REFERENCE, pr1855_model, pr1855_settings

# The stand-in's FlexAttention runs unfused on the CPU, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# The env values that make our GPT the record's (its seed-42 log's hyperparameters, MODEL section only).
RECIPE = {
    "NUM_LAYERS": "11", "MODEL_DIM": "512", "NUM_HEADS": "8", "NUM_KV_HEADS": "4", "VOCAB_SIZE": "8192",
    "MLP_MULT": "4", "MLP_ACT": "leaky2", "NORM_PCT_DROPOUT": "0", "TIE_EMBEDDINGS": "1", "TIED_EMBED_INIT_STD": ".005",
    "LOGIT_SOFTCAP": "30", "SOFTCAP_FP32": "1", "SOFTCAP_ASYM": "0", "ROPE_BASE": "10000", "ROPE_DIMS": "16", "ROPE_FP32": "1",
    "TRAIN_SEQ_LEN": "2048", "QK_GAIN_INIT": "5", "XSA_LAST_N": "11", "LN_SCALE": "1", "ORTHO_INIT": "1",
    "SKIP_GATE": "1", "BIGRAM_BUCKETS": "0", "VALUE_EMBED_LAYERS": "0", "DOC_ATTENTION": "1",
    "ATTN_GATE_DIMS": "12", "ATTN_GATE_MAX": "1", "ATTN_GATE_SCALE": "0.5",  # SPARSE_ATTN_GATE_*, GATE_WINDOW=12
    "SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "12",  # SMEAR_GATE_ENABLED=1, GATE_WINDOW=12
    "PARALLEL_RESID_FROM": "-1", "PARALLEL_LANES_FROM": "8",  # PARALLEL_START_LAYER=8, PARALLEL_FINAL_LANE=mean
    "RECUR_LAYERS": "3-5", "RECUR_LOOPS": "3", "RECUR_START_FRAC": "0.35",  # LOOP_START/END=3/5, NUM_LOOPS=2, at 0.35
}
# The record's settings that its run set and its class defaults leave off.
RECORD = {"smear_gate_enabled": True, "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5}

# A tiny shape that still has a loop (layers 1-2 run 3x) and two lanes (layers 4-5).
TINY_OURS = {"NUM_LAYERS": "6", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "128",
             "ROPE_DIMS": "8", "XSA_LAST_N": "6", "RECUR_LAYERS": "1-2", "PARALLEL_LANES_FROM": "4"}
TINY_RECORD = {"num_layers": 6, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 128, "rope_dims": 8,
               "xsa_last_n": 6, "loop_start": 1, "loop_end": 2, "parallel_start_layer": 4}


# Where the record keeps each of our block matrices: (ours, its bank, k) -> layer i is bank row k * num_layers + i.
BANKS = (("attn.c_q", "qo_bank", 0), ("attn.proj", "qo_bank", 1), ("attn.c_k", "kv_bank", 0),
         ("attn.c_v", "kv_bank", 1), ("mlp.fc", "mlp_up_bank", 0), ("mlp.proj", "mlp_down_bank", 0))


def ours_from_record(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The record's state_dict (or gradients) under our names: its banks unstacked, its gates renamed."""
    out = {f"blocks.{i}.{ours}.weight": state[bank][k * num_layers + i]
           for ours, bank, k in BANKS for i in range(num_layers)}
    for name, t in state.items():
        if not name.endswith("_bank"):
            out[name.replace("attn.attn_gate_w", "attn.attn_gate").replace("smear_gate.weight", "smear_gate")] = t
    return out


def ours_args(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({**RECIPE, **env})


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pair(pr1855, ours_env: dict, record_settings: dict, seed: int = 0):
    """(record GPT, our GPT) holding the same weights: the record's init, every parameter then perturbed so that its
    zero-initialized gates, lambdas and output projections contribute."""
    torch.manual_seed(seed)
    record = pr1855_model(pr1855, pr1855_settings(pr1855, **RECORD, **record_settings))
    for p in record.parameters():
        p.data.add_((0.02 if p.ndim > 1 and p.numel() > 4096 else 0.3) * torch.randn_like(p))
    args = ours_args(**ours_env)
    ours = tg.build_model(args, CPU)
    missing, unexpected = ours.load_state_dict(ours_from_record(record.state_dict(), args.num_layers), strict=False)
    assert not unexpected and set(missing) <= {"recur_active"}, (missing, unexpected)
    return record, ours


def tokens(vocab: int, T: int, docs: bool, seed: int = 1):
    """(input_ids, target_ids, the record's cu_seqlens): one row of T tokens, with BOS tokens inside it when docs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (1, T + 1), generator=g)
    if docs:
        ids[0, [0, T // 5, T // 2, T // 2 + 3, T - 7]] = tg.BOS_ID
    x, y = ids[:, :-1], ids[:, 1:]
    starts = [0] + (x[0] == tg.BOS_ID).nonzero().flatten().tolist() + [T] if docs else None
    return x, y, None if starts is None else torch.tensor(sorted(set(starts)), dtype=torch.int32)


def varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=True, **_):
    """FA3's flash_attn_varlen_func on packed (N, H, D) tokens as SDPA with a dense document mask from cu_seqlens:
    the reference's stand-in computes it with FlexAttention, which has no backward on the CPU. Bucket padding (n) ignored."""
    n = q.size(0)
    inner = cu_seqlens_q[(cu_seqlens_q > 0) & (cu_seqlens_q < n)].long()
    doc = torch.zeros(n, dtype=torch.long).index_fill_(0, inner, 1).cumsum(0)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                         attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(0, 1)


@pytest.fixture(autouse=True)
def varlen_with_backward(pr1855, monkeypatch):
    monkeypatch.setattr(pr1855, "flash_attn_varlen_func", varlen_sdpa)


def compare(pr1855, record, ours, num_layers: int, vocab: int, T: int, loop: bool, docs: bool) -> tuple[float, float]:
    """(loss abs difference, worst gradient relative difference) of one forward and backward on the same tokens."""
    record.looping_active = loop
    ours.set_recurrence(loop)
    x, y, cu = tokens(vocab, T, docs)
    record.zero_grad(), ours.zero_grad()
    theirs = record(x, y, cu_seqlens=cu, max_seqlen=T)
    mine = ours(x, y).mean()
    theirs.backward(), mine.backward()
    if docs:  # the stand-in's FlexAttention (forward only) gives the record the same loss as the dense mask
        with torch.no_grad(), pytest.MonkeyPatch.context() as m:
            m.setattr(pr1855, "flash_attn_varlen_func", sys.modules["flash_attn_interface"].flash_attn_varlen_func)
            assert abs(record(x, y, cu_seqlens=cu, max_seqlen=T).item() - theirs.item()) < 1e-5
    grads = ours_from_record({n: p.grad for n, p in record.named_parameters()}, num_layers)
    own = dict(ours.named_parameters())
    assert set(grads) == set(own)
    # Each gradient's max abs difference relative to its max abs value (rows that no path reaches are zero in both).
    return abs(mine.item() - theirs.item()), max(((p.grad - grads[name]).abs().max() / grads[name].abs().max()).item()
                                                 for name, p in own.items())


def test_parameter_count_is_the_records(pr1855):
    """35,945,671: the record's run (its log's model_params); 35,944,602 with its class defaults (both gates off)."""
    logged = int(re.search(r"^model_params:(\d+)$", (REFERENCE / "pr1855" / "train_seed42.log").read_text(), re.M)[1])
    with torch.device("meta"):
        assert count(tg.GPT(ours_args())) == logged == 35_945_671
        assert count(tg.GPT(ours_args(ATTN_GATE_DIMS="0", SMEAR_GATE="0", SMEAR_GATE_DIMS="0"))) == 35_944_602


def test_parameter_groups_are_the_records(pr1855):
    # The record's Muon takes its four banks, its scalar Adam every other tensor but the embedding, which the
    # export keeps float.
    _, ours = pair(pr1855, TINY_OURS, TINY_RECORD)
    banked = {f"blocks.{i}.{name}.weight" for name, _, _ in BANKS for i in range(6)}
    groups = {id(p): g for g, ps in ours.param_groups().items() for p in ps}
    for name, p in ours.named_parameters():
        want = "embed" if name == "tok_emb.weight" else "matrix" if name in banked else "scalar"
        assert groups[id(p)] == want, name
        big = torch.zeros(1024, 1024)  # any 2-D tensor under a control name stays float, whatever its size
        # (the attention gate is its own class: float too, unless QUANT_GATE=int8 rounds it as the record's export)
        assert (want == "scalar") == (tg.tensor_class(name, big, 65_536) in (None, "gate")), name


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_tiny_forward_and_gradients_equal_the_records(pr1855, loop, docs):
    record, ours = pair(pr1855, TINY_OURS, TINY_RECORD)
    loss_diff, grad_diff = compare(pr1855, record, ours, 6, 128, 64, loop, docs)
    print(f"tiny loop={loop} docs={docs}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-4


@pytest.fixture(scope="module")
def full_pair(pr1855):
    return pair(pr1855, {}, {})


@pytest.mark.parametrize("loop", [pytest.param(False, marks=pytest.mark.slow), True])  # the default's loop on: not slow
@pytest.mark.parametrize("docs", [False, True])
def test_full_shape_forward_and_gradients_equal_the_records(pr1855, full_pair, loop, docs):
    record, ours = full_pair
    loss_diff, grad_diff = compare(pr1855, record, ours, 11, 8192, 256, loop, docs)
    print(f"full loop={loop} docs={docs}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-4


def test_recipe_survives_the_artifact_roundtrip(pr1855):
    # The artifact's settings rebuild the recipe's model, recurrence on, which computes what ours does on the
    # artifact's (dequantized) weights; its gates and lambdas are kept exactly.
    _, ours = pair(pr1855, TINY_OURS, TINY_RECORD)
    ours.set_recurrence(True)
    args = ours_args(**TINY_OURS, QUANT_CONTROL="fp32", QUANT_GATE="float")  # the recipe's fp16/int8 are not exact
    qsd = tg.quantize_state_dict(ours.state_dict(), args)
    fresh, _ = tg.model_from_artifact(tg.pack_artifact(qsd, args.settings, "zlib"), CPU)
    control = {n: t.clone() for n, t in ours.state_dict().items()
               if any(k in n for k in ("smear", "lambda", "attn_gate"))}
    ours.load_state_dict(tg.dequantize_state_dict(qsd))
    x, y, _ = tokens(128, 64, True)
    assert fresh.recur_active and torch.allclose(fresh(x, y), ours(x, y), atol=1e-6)
    assert len(control) == 6 + 4 and all(torch.equal(fresh.state_dict()[n], t) for n, t in control.items())


@pytest.mark.slow
def test_compiled_recipe_takes_the_switch_without_recompiling(pr1855):
    # torch.cond holds both run orders: the compiled forward and backward equal eager's before and after the switch.
    _, ours = pair(pr1855, TINY_OURS, TINY_RECORD)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=False)
    x, y, _ = tokens(128, 64, True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for loop in (False, True):
        ours.set_recurrence(loop)
        results = []
        for model in (compiled, ours):
            ours.zero_grad()
            loss = model(x, y)
            loss.mean().backward()
            results.append((loss, [p.grad.clone() for p in ours.parameters()]))
        (a, grads_a), (b, grads_b) = results
        assert torch.allclose(a, b, atol=1e-6) and all(torch.allclose(u, v, atol=1e-7) for u, v in zip(grads_a, grads_b))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
