"""Attention (docs/model.md "Attention"): DOC_ATTENTION keeps every document apart in training and in every evaluation
path; the packed varlen path agrees with the dense-mask reference; the kernel choice and its log line."""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._subclasses.fake_tensor import FakeTensorMode

import train_gpt as tg
from conftest import CPU, ROOT

# A tiny default-stack model (SmearGate, BigramHash, XSA, grouped-query heads) and eval settings: 4 windows per
# batch, 2 TTT training sequences per chunk, 4 LoRA slots.
ENV = {
    "STACK": "1.1194", "VOCAB_SIZE": "64", "NUM_LAYERS": "4", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "BIGRAM_BUCKETS": "32", "BIGRAM_DIM": "8", "XSA_LAST_N": "2", "ROPE_DIMS": "4", "PARALLEL_RESID_FROM": "2",
    "TRAIN_SEQ_LEN": "32", "VAL_BATCH_SIZE": "1024", "COMPILE": "0", "EVAL_STRIDE": "8", "EVAL_MAX_SECONDS": "1e6",
    "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64", "TTT_EPOCHS": "1", "TTT_LR": "0.05", "TTT_PARAMS": "*",
    "LORA_TTT_ENABLED": "1", "LORA_CHUNK_TOKENS": "8", "LORA_SLOTS": "4", "LORA_LR": "0.05",
}


def args_with(**env) -> tg.Hyperparameters:
    env = {**ENV, **{k: str(v) for k, v in env.items()}}
    model = env.get("MODEL", "gpt")
    return tg.Hyperparameters({k: v for k, v in env.items() if tg.SETTINGS[k].model in (None, model)})


def model_for(args, seed=0):
    # Random weights everywhere: zero-initialized projections would make context irrelevant.
    torch.manual_seed(seed)
    model = tg.build_model(args, CPU)
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    return model.eval()


def doc_stream(n, seed=0):
    """n tokens of documents of 5..40 tokens, each starting with BOS; and the (start, end) of each document."""
    g = torch.Generator().manual_seed(seed)
    tokens, starts, pos = torch.randint(2, 64, (n,), generator=g), [], 0
    while pos < n:
        tokens[pos] = tg.BOS_ID
        starts.append(pos)
        pos += int(torch.randint(5, 40, (1,), generator=g))
    return tokens, list(zip(starts, starts[1:] + [n]))


def rewrite(tokens, doc, seed=99):
    # New text for one document; its BOS and length stay, so no boundary moves.
    changed = tokens.clone()
    a, b = doc
    changed[a + 1 : b] = torch.randint(2, 64, (b - a - 1,), generator=torch.Generator().manual_seed(seed))
    return changed


def other_docs(docs, doc, n):
    """Mask over targets 0..n-1 of every document but `doc`: target t belongs to the document of its input token t."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[doc[0] : doc[1]] = False
    return keep


def path_losses(name, args, model, tokens):
    losses = torch.zeros(tokens.numel() - 1)
    luts = torch.ones(tokens.numel(), dtype=torch.int16)  # a byte sidecar: one byte per target
    tg.EVAL_PATHS[name].run(args, model, tokens, luts, 0, 1, CPU, losses=losses)
    return losses


def varlen_by_segment(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract computed segment by segment with causal SDPA: the CPU stand-in for its CUDA kernel."""
    assert torch.equal(cu_q, cu_k) and window_size == (-1, 0) and cu_q.dtype == torch.int32
    assert int((cu_q[1:] - cu_q[:-1]).max()) <= max_q == max_k and int(cu_q[-1]) == q.size(0)
    out = torch.zeros_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if b > a:
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


@pytest.fixture
def short_docs(monkeypatch):
    # Room for this file's short documents (5 tokens or more) in a packed batch.
    monkeypatch.setattr(tg, "MIN_DOC_TOKENS", 4)


@pytest.fixture
def packed(monkeypatch, short_docs):
    """Run the packed path on CPU: varlen_attn replaced by the per-segment stand-in."""
    monkeypatch.setattr(tg, "varlen_attn", varlen_by_segment)


# -----------------------------
# Packing: cu_seqlens and the packed path against the dense mask
# -----------------------------

def test_cu_seqlens_start_a_segment_at_every_bos_and_row_start_in_a_fixed_length(short_docs):
    ids = torch.tensor([[5, 1, 7, 7, 1, 9, 9, 9], [1, 3, 3, 3, 3, 1, 2, 2]])
    cu = tg.doc_cu_seqlens(ids)
    # 8 // 4 + 2 = 4 slots per row; a row's unused slots are empty segments at its end.
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 1, 4, 8, 8, 13, 16, 16, 16]
    # The length depends on the shape only: no BOS at all gives the same length.
    assert tg.doc_cu_seqlens(torch.full((2, 8), 5)).tolist() == [0, 8, 8, 8, 8, 16, 16, 16, 16]


def test_cu_seqlens_past_capacity_merge_documents_within_their_row_only(short_docs):
    ids = torch.ones(2, 8, dtype=torch.long)  # sixteen one-token documents, 4 slots per row
    assert tg.doc_cu_seqlens(ids).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16]


def test_cu_seqlens_compile_once_for_every_document_layout(short_docs):
    counter = CompileCounter()
    build = torch.compile(tg.doc_cu_seqlens, backend=counter, fullgraph=True, dynamic=False)
    for seed in range(3):
        ids, _ = doc_stream(4 * 32, seed)
        assert torch.equal(build(ids.view(4, 32)), tg.doc_cu_seqlens(ids.view(4, 32)))
    assert counter.frame_count == 1


@pytest.mark.parametrize("kv_heads,scale", [(4, None), (2, None), (1, 0.7)])
def test_packed_attention_equals_the_document_mask(packed, kv_heads, scale):
    torch.manual_seed(0)
    ids = doc_stream(3 * 24, seed=kv_heads)[0].view(3, 24)
    ids[1, 0] = 7  # a row that starts inside a document
    q = torch.randn(3, 4, 24, 8, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, 24, 8, requires_grad=True) for _ in range(2))
    ref = tg.causal_attention(q, k, v, scale, mask=tg.doc_mask(ids))
    out = tg.causal_attention(q, k, v, scale, cu_seqlens=tg.doc_cu_seqlens(ids))
    assert torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
    assert not torch.allclose(tg.causal_attention(q, k, v, scale), ref, atol=1e-3)  # documents do matter here


@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_packed_model_forward_equals_the_masked_one(packed, model):
    args = args_with(MODEL=model)
    net = model_for(args)
    ids = doc_stream(4 * 32)[0].view(4, 32)
    y = torch.roll(ids, -1, 1)
    assert net.attention_kernel == "sdpa_masked"
    ref = net(ids, y)
    net.attention_kernel = "varlen"
    assert torch.allclose(net(ids, y), ref, atol=1e-5)


def test_varlen_attn_traces_on_fake_cuda_in_bf16_with_grouped_heads():
    # varlen_attn has no CPU kernel; its fake registration checks the CUDA call's shapes and dtypes.
    with FakeTensorMode(allow_non_fake_inputs=False):
        cuda = torch.device("cuda")
        ids = torch.randint(2, 64, (2, 64), device=cuda)
        q = torch.randn(2, 4, 64, 16, device=cuda)
        k, v = (torch.randn(2, 2, 64, 16, device=cuda, dtype=torch.bfloat16) for _ in range(2))
        cu = tg.doc_cu_seqlens(ids)
        y = tg.packed_attention(q.bfloat16(), k, v, cu, None)
        assert cu.device.type == "cuda" and cu.shape == (2 * (64 // tg.MIN_DOC_TOKENS + 2) + 1,)
        assert y.shape == q.shape and y.dtype == torch.bfloat16 and y.device.type == "cuda"


# -----------------------------
# One document never reaches another
# -----------------------------

@pytest.mark.parametrize("stream", [False, True])  # TRAIN_STREAM: rows, or the batch as one stream
@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_training_forward_keeps_documents_apart(model, stream):
    args = args_with(MODEL=model)
    net = model_for(args).train()
    tokens, docs = doc_stream(4 * 32 + 1)
    x, y = tokens[:-1].view(4, 32), tokens[1:].view(4, 32)
    doc = docs[3]
    x2 = rewrite(tokens, doc)[:-1].view(4, 32)
    keep = other_docs(docs, doc, 4 * 32).view(4, 32)
    a, b = net(x, y, stream), net(x2, y, stream)
    assert torch.equal(a[keep], b[keep]) and not torch.allclose(a[~keep], b[~keep])
    net.doc_attention = False  # the probe is not blind: without document attention the change leaks
    assert not torch.allclose(net(x, y)[keep], net(x2, y)[keep])


@pytest.mark.parametrize("name", ["roundtrip", "sliding_window", "lora_ttt", "phased_ttt"])
def test_scores_of_other_documents_never_change(name):
    # Phased TTT without its global phases and with adapters drawn fresh per batch: nothing carries between rows.
    args = args_with(PHASED_TTT_PREFIX_DOCS=0, LORA_WARM_A=0) if name == "phased_ttt" else args_with()
    model = model_for(args)
    tokens, docs = doc_stream(301)
    doc = docs[4]
    keep = other_docs(docs, doc, 300)
    a, b = path_losses(name, args, model, tokens), path_losses(name, args, model, rewrite(tokens, doc))
    assert torch.equal(a[keep], b[keep]) and not torch.equal(a[~keep], b[~keep])
    if "lora" not in name and "phased" not in name:  # LoRA rows hold one document each, with or without it
        model.doc_attention = False  # the probe is not blind: without document attention the change leaks
        a, b = path_losses(name, args, model, tokens), path_losses(name, args, model, rewrite(tokens, doc))
        assert not torch.equal(a[keep], b[keep])


def test_ttt_changes_other_documents_only_through_adaptation():
    # A target of another document may move only once TTT has trained on a chunk that reads the changed tokens:
    # chunk c trains on targets c * chunk .. (c + 1) * chunk - 1, whose labels reach token (c + 1) * chunk.
    args = args_with()
    model = model_for(args)
    tokens, docs = doc_stream(301)
    doc = next(d for d in docs if d[0] > 70)
    first_trained = doc[0] // args.ttt_chunk_tokens  # target doc[0] is the first to read one (its label)
    a, b = path_losses("ttt", args, model, tokens), path_losses("ttt", args, model, rewrite(tokens, doc))
    keep = other_docs(docs, doc, 300)
    scored_before = torch.arange(300) < (first_trained + 1) * args.ttt_chunk_tokens
    assert torch.equal(a[keep & scored_before], b[keep & scored_before])
    assert not torch.equal(a[keep & ~scored_before], b[keep & ~scored_before])  # adaptation does carry it


def test_phased_ttt_changes_other_documents_only_after_their_batch_is_scored():
    # The default's score path: warm adapters, the batch's one AdamW step and the global SGD phases carry what was
    # scored into what is scored next (score-first); a document's change must not reach any batch scored before its own.
    args = args_with(PHASED_TTT_PREFIX_DOCS=8, PHASED_TTT_NUM_PHASES=2, LORA_WARM_A=1)
    model = model_for(args)
    tokens, docs = doc_stream(301)
    batches, order = tg.length_batches(docs, args.lora_slots)
    taken = [d for k in order for d in batches[k]]  # documents in the order their batches are scored
    changed = len(taken) // 2
    doc = docs[taken[changed]]
    a, b = path_losses("phased_ttt", args, model, tokens), path_losses("phased_ttt", args, model, rewrite(tokens, doc))
    batch_start = changed // args.lora_slots * args.lora_slots
    before = torch.zeros(300, dtype=torch.bool)
    for d in taken[:batch_start]:
        before[docs[d][0] : min(docs[d][1], 300)] = True
    keep = other_docs(docs, doc, 300)
    assert torch.equal(a[keep & before], b[keep & before]) and not torch.equal(a[~keep], b[~keep])
    assert not torch.equal(a[keep & ~before], b[keep & ~before])  # adaptation does carry it


# -----------------------------
# Settings, kernel choice and the log
# -----------------------------

def test_doc_attention_is_the_default_and_baseline_turns_it_off():
    assert tg.Hyperparameters({}).doc_attention and not tg.Hyperparameters({"BASELINE": "1"}).doc_attention
    with pytest.raises(tg.ConfigError, match="EVAL_ISOLATE_DOCS.*DOC_ATTENTION"):
        tg.Hyperparameters({"EVAL_ISOLATE_DOCS": "1"})


def test_without_doc_attention_the_forward_is_plain_causal_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    net = model_for(args_with(DOC_ATTENTION=0))
    ids = doc_stream(64)[0].view(2, 32)
    net(ids, ids)
    assert len(calls) == 4 and all(kw["is_causal"] and "attn_mask" not in kw for kw in calls)


@pytest.mark.parametrize("device,doc,capability,fa3,kernel", [
    ("cpu", True, 0, False, "sdpa_masked"), ("cpu", False, 0, True, "sdpa"),
    ("cuda", True, 7, True, "sdpa_masked"), ("cuda", False, 7, False, "sdpa"),
    ("cuda", True, 8, False, "varlen"), ("cuda", False, 8, True, "flash"),  # FA3 needs sm90
    ("cuda", True, 9, False, "varlen"), ("cuda", False, 9, False, "flash"),
    ("cuda", True, 9, True, "fa3_varlen"), ("cuda", False, 9, True, "fa3"),
    ("cuda", True, 10, True, "varlen"),
])
def test_attention_kernel_choice(device, doc, capability, fa3, kernel):
    chosen, why = tg.attention_kernel(device, doc, capability, fa3)
    assert chosen == kernel and why
    assert (chosen in tg.PACKED_KERNELS) == (kernel.endswith("varlen"))


@pytest.mark.parametrize("doc", [0, 1])
def test_fa3_is_switched_on_through_pytorch_and_the_log_names_the_kernel(monkeypatch, doc):
    activated, lines = [], []
    monkeypatch.setattr(tg, "attention_support", lambda device: (9, True))
    monkeypatch.setattr(torch.nn.attention, "activate_flash_attention_impl", activated.append)
    run = SimpleNamespace(device=torch.device("cuda", 0), args=args_with(DOC_ATTENTION=doc), log=lines.append)
    tg.activate_attention(run)
    assert activated == ["FA3"]
    kernel = "fa3_varlen" if doc else "fa3"
    assert re.fullmatch(rf"attention:kernel={kernel} doc_attention:{doc} device:cuda capability:9 fa3_installed:1 why:.+",
                        lines[0])


def test_cpu_run_logs_the_masked_reference_and_activates_nothing(monkeypatch):
    activated, lines = [], []
    monkeypatch.setattr(torch.nn.attention, "activate_flash_attention_impl", activated.append)
    tg.activate_attention(SimpleNamespace(device=CPU, args=args_with(), log=lines.append))
    assert not activated and lines[0].startswith("attention:kernel=sdpa_masked doc_attention:1 device:cpu ")


def test_no_bare_flash_attention_import():
    source = (ROOT / "train_gpt.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+flash_attn", source, re.M)


def test_packed_model_compiles_once_for_every_document_layout_on_fake_cuda():
    # The graph a CUDA run compiles (varlen_attn, no graph break) is built once, whatever the documents' places.
    args = args_with(NUM_LAYERS=2, XSA_LAST_N=1, PARALLEL_RESID_FROM=1)
    counter = CompileCounter()
    with FakeTensorMode(), torch.device("cuda"):
        model = tg.GPT(args)
        model.attention_kernel = "varlen"
        net = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        for first in range(3):
            ids = torch.randint(2, 64, (2, 32))
            ids[:, first :: 5 + first] = tg.BOS_ID
            assert net(ids, ids).shape == (2, 32)
    assert counter.frame_count == 1


def test_gptq_calibration_takes_the_masked_kernel_in_fp32(monkeypatch):
    # varlen_attn has no fp32 kernel: the fp32 calibration copy of a packed model attends through the document mask.
    monkeypatch.setattr(tg, "varlen_attn", lambda *a, **kw: pytest.fail("varlen_attn called in fp32"))
    model = model_for(args_with())
    model.attention_kernel = "varlen"
    ids = doc_stream(2 * 32)[0].view(2, 32)
    hessians = tg.collect_hessians(model, [(ids, ids)])
    assert hessians and model.attention_kernel == "varlen"
