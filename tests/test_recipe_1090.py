"""STACK=1090 computes what #1090's script computes (openai/parameter-golf #1090, ../shared/reference/pr1090: 1.1573
after LoRA TTT, one H100 PCIe), against its own code on the CPU: its model's loss and every gradient on its weights,
one step of each of its optimizers (and the one parameter it never trains), its mixed int5/int6/int8 quantizer's
dequantized weights, the step its SWA starts at, and its LoRA TTT's scores, driven through its own main() (the TTT
is inline there) on a small val stream with documents under 32 tokens. docs/stack-1090.md lists what still differs."""

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, REFERENCE, require_reference
from test_baseline import trained_like

PATH = REFERENCE / "pr1090" / "train_gpt.py"
# A small shape of its model: 5 layers, so XSA (its last 4) leaves the first one out.
SMALL = {"STACK": "1090", "VOCAB_SIZE": "128", "NUM_LAYERS": "5", "MODEL_DIM": "64", "NUM_HEADS": "4",
         "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "64", "LORA_CHUNK_TOKENS": "64"}


@pytest.fixture(scope="module")
def pr1090():
    require_reference(PATH)
    sys.path.insert(0, str(REFERENCE))
    from load_reference import load
    return load("pr1090")


def their_gpt(ref, args):
    # Its run's MLP_MULT=3 makes SwiGLU's hidden int(2 * 3 * dim / 3) = 2 * dim: our MLP_MULT=2.
    return ref.GPT(vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim,
                   num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, mlp_mult=3, tie_embeddings=True,
                   tied_embed_init_std=args.tied_embed_init_std, logit_softcap=args.logit_softcap,
                   rope_base=args.rope_base, qk_gain_init=args.qk_gain_init)


def ours_from_theirs(state: dict) -> dict:
    """Its names -> ours: SwiGLU's gate is our fc; its SmearGate's gate (never trained: a fixed 0.5) we do not store."""
    return {k.replace("mlp.gate.", "mlp.fc."): v for k, v in state.items() if k != "smear.gate"}


def pair(ref, **env):
    """(its GPT, ours under STACK=1090, our Hyperparameters) on the same weights, moved off the init."""
    args = tg.Hyperparameters({**SMALL, **env})
    torch.manual_seed(0)
    theirs = their_gpt(ref, args)
    state = trained_like(theirs)
    state["smear.gate"] = torch.zeros_like(state["smear.gate"])
    theirs.load_state_dict(state)
    ours = tg.build_model(args, CPU)
    ours.load_state_dict(ours_from_theirs(state))
    return theirs, ours, args


def tokens(args, T=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, args.vocab_size, (2, T + 1), generator=g)
    x[:, [9, 40]] = tg.BOS_ID  # documents inside the window: its attention and smear cross them, as ours here
    return x[:, :-1], x[:, 1:]


def test_parameter_count_is_its_logs_less_the_untrained_smear_gate(pr1090):
    """26,502,232 in its technical report; its SmearGate's 512 gate values are never in an optimizer (below)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in tg.GPT(tg.Hyperparameters({"STACK": "1090"})).parameters())
    assert count == 26_502_232 - 512


def test_loss_and_every_gradient_are_1090s(pr1090):
    theirs, ours, args = pair(pr1090)
    x, y = tokens(args)
    loss_theirs, loss_ours = theirs(x, y), ours(x, y).mean()
    loss_theirs.backward(), loss_ours.backward()
    # XSA divides by |v|^2 there and normalizes v here: equal up to float32 rounding.
    assert abs(loss_theirs.item() - loss_ours.item()) < 2e-6
    grads = ours_from_theirs({n: p.grad for n, p in theirs.named_parameters()})
    own = dict(ours.named_parameters())
    assert set(grads) == set(own)
    worst = max(((p.grad - grads[n]).abs().max() / grads[n].abs().max()).item() for n, p in own.items())
    print(f"small: loss {abs(loss_theirs.item() - loss_ours.item()):.2e} grad {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_full_shape_loss_and_gradients_are_1090s(pr1090):
    """Its run's shape (11 x 512, vocab 1024) on 256 tokens."""
    full = {k: v for k, v in SMALL.items() if k == "STACK"}
    args = tg.Hyperparameters(full)
    torch.manual_seed(0)
    theirs = their_gpt(pr1090, args)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name != "smear.gate":
                p.add_(0.02 * torch.randn_like(p))
    ours = tg.build_model(args, CPU)
    ours.load_state_dict(ours_from_theirs(theirs.state_dict()))
    x, y = tokens(args, T=256)
    loss_theirs, loss_ours = theirs(x, y), ours(x, y).mean()
    loss_theirs.backward(), loss_ours.backward()
    grads = ours_from_theirs({n: p.grad for n, p in theirs.named_parameters()})
    worst = max(((p.grad - grads[n]).abs().max() / grads[n].abs().max()).item() for n, p in ours.named_parameters())
    print(f"full: loss {abs(loss_theirs.item() - loss_ours.item()):.2e} grad {worst:.2e}")
    assert abs(loss_theirs.item() - loss_ours.item()) < 1e-5 and worst < 1e-4


def test_one_step_of_each_optimizer_is_1090s(pr1090, monkeypatch):
    """Its main()'s groups (Muon: the blocks' non-control matrices; Adam: the embedding at TIED_EMBED_LR, the blocks'
    other tensors and the skip weights at SCALAR_LR; nothing holds smear.gate), its Muon without weight decay (its
    MUON_WD never reaches the optimizer), one step from the same gradients."""
    theirs, ours, args = pair(pr1090)
    x, y = tokens(args)
    theirs(x, y).backward()
    for name, g in ours_from_theirs({n: p.grad for n, p in theirs.named_parameters()}).items():
        dict(ours.named_parameters())[name].grad = g.clone()
    # Its Newton-Schulz runs in bf16 everywhere, ours in bf16 on CUDA only: here ours calls its.
    monkeypatch.setattr(tg, "zeropower_via_newtonschulz5", lambda G, steps, eps, coeffs: torch.stack(
        [pr1090.zeropower_via_newtonschulz5(g, steps, eps) for g in G]))
    optimizers, muon = tg.build_optimizers(args, ours)
    blocks = list(theirs.blocks.named_parameters())
    control = lambda n: any(pat in n for pat in pr1090.CONTROL_TENSOR_NAME_PATTERNS)  # noqa: E731
    matrices = [p for n, p in blocks if p.ndim == 2 and not control(n)]
    scalars = [p for n, p in blocks if p.ndim < 2 or control(n)] + [theirs.skip_weights]
    held = {id(p) for p in matrices + scalars + [theirs.tok_emb.weight]}
    assert [n for n, p in theirs.named_parameters() if id(p) not in held] == ["smear.gate"]
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=True)
    their_opts = [torch.optim.Adam([theirs.tok_emb.weight], lr=args.tied_embed_lr, **adam),
                  pr1090.Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum,
                              backend_steps=args.muon_backend_steps),
                  torch.optim.Adam(scalars, lr=args.scalar_lr, **adam)]
    for opt in (their_opts[1], muon):  # step 0 of the momentum warm-up, as both main()s set it
        opt.param_groups[0]["momentum"] = tg.muon_momentum(args, 0)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    tg.step_optimizers(optimizers, muon, args.grad_clip_norm)
    for opt in their_opts:
        opt.step()
    after = ours_from_theirs(dict(theirs.named_parameters()))
    on_muon = {id(p) for p in muon.param_groups[0]["params"]}
    for name, p in ours.named_parameters():
        assert not torch.equal(p, before[name]), name
        if id(p) in on_muon:  # Muon's matrices to the bit
            assert torch.equal(p, after[name]), name
        else:  # Adam fused there, unfused here on the CPU: within float32 rounding
            assert torch.allclose(p, after[name], rtol=1e-6, atol=1e-7), name


def test_dequantized_weights_are_1090s_mixed_quantization(pr1090):
    """int5 MLP, int6 attention, int8 embedding, each row on a grid of its |w|max with an fp16 scale; tensors of at
    most 896 values and control tensors kept in fp16."""
    theirs, ours, args = pair(pr1090)
    theirs_dq = ours_from_theirs(pr1090.dequantize_state_dict_mixed(pr1090.quantize_state_dict_mixed(
        theirs.state_dict())))
    qsd = tg.quantize_state_dict(ours.state_dict(), args)
    ours_dq = tg.dequantize_state_dict(qsd)
    assert set(theirs_dq) == set(ours_dq)
    for name, w in ours_dq.items():
        assert torch.equal(w.float(), theirs_dq[name].float()), name
    codes = {n: int(e["q"].abs().max()) for n, e in qsd.items() if "q" in e}
    assert codes["tok_emb.weight"] == 127 and codes["blocks.0.attn.c_k.weight"] == 31
    assert codes["blocks.0.mlp.fc.weight"] == codes["blocks.0.mlp.up.weight"] == 15
    assert "w" in qsd["blocks.0.attn.q_gain"] and qsd["skip_weights"]["w"].dtype == torch.float16


def test_swa_starts_where_1090s_log_says_and_averages_in_fp32():
    """Its log: 'SWA: started at step 5000 (warmdown_start~4922)', 15 checkpoints by step 7,926 of 4,850 s; its
    average: the fp32 sum of the snapshots over their count, cast to each weight's dtype."""
    args = tg.Hyperparameters({"STACK": "1090"})
    pace = 4_850_000 / 7_922.5  # ms per step that projects 7,922 steps at step 5,000
    clock = SimpleNamespace(budget_ms=1000.0 * args.max_wallclock_seconds, step=5000, ms=5000 * pace)
    assert tg.swa_start(args, clock) == 4922
    snapshots = [s for s in range(200, 7927, 200) if s >= tg.swa_start(args, SimpleNamespace(
        budget_ms=clock.budget_ms, step=s, ms=s * pace))]
    assert len(snapshots) == 15 and snapshots[0] == 5000
    model = torch.nn.Linear(4, 3).bfloat16()
    swa, seen = tg.WeightSWA(model), []
    for k in range(3):
        with torch.no_grad():
            model.weight.add_(0.3 * k + 0.01)
        seen.append(model.weight.detach().float().clone())
        swa.add()
    swa.apply()
    assert torch.equal(model.weight, (sum(seen) / 3).to(torch.bfloat16)) and swa.count == 3


def test_chunks_that_would_split_its_unadapted_short_documents_are_refused():
    """Its documents under 32 tokens are one forward without adapting: chunks of 31 targets keep them whole here."""
    with pytest.raises(tg.ConfigError, match="^LORA_CHUNK_TOKENS=30 with LORA_CHUNK_CONTEXT=1 .* at least 31$"):
        tg.Hyperparameters({**SMALL, "LORA_CHUNK_TOKENS": "30"})
    assert tg.Hyperparameters({**SMALL, "LORA_CHUNK_TOKENS": "31"}).lora_chunk_tokens == 31


# -----------------------------
# LoRA TTT through its main()
# -----------------------------

class TorchOnCPU(types.ModuleType):
    """torch as its main() sees it here: CUDA calls answered on the CPU, compile the identity, and randn (its LoRA's
    first init) giving what `draws` hands out."""

    def __init__(self, draws):
        super().__init__("torch")
        self.cuda = SimpleNamespace(is_available=lambda: True, set_device=lambda *a: None,
                                    synchronize=lambda *a: None, manual_seed_all=lambda *a: None,
                                    max_memory_allocated=lambda *a: 0, max_memory_reserved=lambda *a: 0)
        self.device = lambda *a, **k: CPU
        self.compile = lambda fn, **k: fn
        self.randn = lambda *shape, **k: draws.pop(0)

    def __getattr__(self, name):
        return getattr(torch, name)


def crafted_val(tiny_data, seq_len: int, lengths: list[int]) -> np.ndarray:
    """Documents of the given lengths (BOS included) from the tiny val split's text tokens; padded so that its val
    loader keeps the whole stream."""
    data_path, _ = tiny_data
    text = tg.load_data_shard(sorted(data_path.glob("fineweb_val_0*.bin"))[0]).numpy()
    text = text[text != tg.BOS_ID]
    out, at = [], 0
    for n in lengths:
        out += [tg.BOS_ID, *text[at : at + n - 1]]
        at += n - 1
    pad = (-(len(out) - 1)) % seq_len
    out += [tg.BOS_ID, *text[at : at + pad - 1]] if pad > 1 else [*text[at : at + pad]]
    return np.array(out, dtype=np.uint16)


# Documents it drops (under 5 tokens), scores whole without adapting (under 32), of exactly 32, and longer ones whose
# last chunk holds one target (it skips it); chunks of 31: the shortest LORA_CHUNK_CONTEXT=1 admits.
@pytest.mark.parametrize("lengths,chunk", [([3, 12, 31, 32, 65, 66, 130, 200], 64),
                                           ([1, 2, 4, 5, 31, 32, 33, 62, 63, 64, 100], 31)], ids=["64", "31"])
def test_lora_ttt_scores_are_1090s(pr1090, tiny_data, tmp_path, monkeypatch, lengths, chunk):
    """Its main() on the CPU (no training: its init moved off by noise) exports, dequantizes and runs its LoRA TTT;
    each of its scoring forwards (a chunk's mean loss) equals the mean of our per-target scores over the same targets,
    our LoRA TTT under STACK=1090 on the weights it dequantized, with our one adapter draw put into its resets."""
    from build_shards import write_shard
    data_path, tok = tiny_data
    seq_len = 128
    write_shard(tmp_path / "fineweb_val_000000.bin", crafted_val(tiny_data, seq_len, lengths))
    (tmp_path / "fineweb_train_000000.bin").symlink_to(sorted(data_path.glob("fineweb_train_*.bin"))[0])
    env = {**SMALL, "VOCAB_SIZE": "384", "NUM_LAYERS": "2", "TRAIN_SEQ_LEN": str(seq_len),
           "LORA_CHUNK_TOKENS": str(chunk), "LORA_SLOTS": "3"}
    args = tg.Hyperparameters(env)
    H = pr1090.Hyperparameters
    for name, value in dict(data_path=str(tmp_path), train_files=str(tmp_path / "fineweb_train_*.bin"),
                            val_files=str(tmp_path / "fineweb_val_*.bin"), tokenizer_path=str(tok), vocab_size=384,
                            num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=seq_len,
                            iterations=0, warmup_steps=0, run_id="ttt").items():
        monkeypatch.setattr(H, name, value)
    monkeypatch.setenv("TTT_CHUNK_SIZE", str(chunk))
    monkeypatch.chdir(tmp_path)

    # Our adapters' one draw (the same for every document), as its (rank, in) A and (out, rank) B.
    lora = tg.LoRA(tg.build_model(args, CPU), args.lora_targets, args.lora_rank, 1, args.seed, args.lora_scale,
                   (args.lora_a_std, args.lora_b_std))
    ours_init = [t[0].T.contiguous() for pair_ in zip(lora.A_init, lora.B_init) for t in pair_]
    first = [t / std for t, std in zip(ours_init, [args.lora_a_std, args.lora_b_std] * len(lora.A))]
    state = {"ttt": False, "eval": False, "resets": 0, "calls": [], "dequantized": None}
    real_normal = torch.nn.init.normal_

    def normal_(t, mean=0.0, std=1.0):  # its per-document reset: our draw, in its module order
        if not state["ttt"]:
            return real_normal(t, mean, std)
        with torch.no_grad():
            t.copy_(ours_init[state["resets"] % len(ours_init)])
        state["resets"] += 1
        return t

    class Recorded(pr1090.GPT):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name != "smear.gate":
                        p.add_(0.05 * torch.randn(p.shape, generator=g))

        def bfloat16(self):  # float32 on the CPU, as ours
            return self

        def forward(self, x, y):
            loss = super().forward(x, y)
            if state["ttt"] and not state["eval"]:
                state["calls"].append((x[0].clone(), loss.item(), torch.is_grad_enabled()))
            return loss

    def dequantize(q):
        state["dequantized"] = out = pr1090_dequantize(q)
        state["ttt"] = True
        return out

    def eval_val(*a, **k):
        state["eval"] = True
        try:
            return pr1090_eval_val(*a, **k)
        finally:
            state["eval"] = False

    pr1090_dequantize, pr1090_eval_val = pr1090.dequantize_state_dict_mixed, pr1090.eval_val
    monkeypatch.setattr(pr1090, "torch", TorchOnCPU(first))
    monkeypatch.setattr(pr1090, "GPT", Recorded)
    monkeypatch.setattr(pr1090, "dequantize_state_dict_mixed", dequantize)
    monkeypatch.setattr(pr1090, "eval_val", eval_val)
    monkeypatch.setattr(pr1090, "subprocess", SimpleNamespace(run=lambda *a, **k: SimpleNamespace(stdout=""),
                                                              PIPE=None))
    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    for backend in ("cudnn", "flash", "mem_efficient", "math"):
        monkeypatch.setattr(torch.backends.cuda, f"enable_{backend}_sdp", lambda on: None)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pr1090.main()
    state["ttt"] = False
    assert state["dequantized"] is not None and state["calls"], "its TTT never ran (its main() logs why)"

    val_tokens = pr1090.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len).long()
    ours = tg.build_model(args, CPU)
    ours.load_state_dict(ours_from_theirs(state["dequantized"]))
    sp = tg.spm.SentencePieceProcessor(model_file=str(tok))
    luts = tg.build_sentencepiece_luts(sp, args.vocab_size, CPU)
    losses = torch.zeros(val_tokens.numel() - 1)
    tg.evaluate_lora_ttt(args, ours, val_tokens, luts, 0, 1, CPU, losses=losses)

    # Its scoring order: documents under 32 tokens first, then each longer one chunk by chunk.
    bos = (val_tokens == tg.BOS_ID).nonzero().flatten().tolist() + [val_tokens.numel()]
    docs = [(a, b - a) for a, b in zip(bos, bos[1:]) if b - a >= 5]
    expected = [(a, a + n - 1) for a, n in docs if n < 32]
    for a, n in (d for d in docs if d[1] >= 32):
        expected += [(a + c, a + min(c + chunk, n - 1)) for c in range(0, n - 1, chunk) if min(chunk, n - 1 - c) >= 2]
    assert [(int(x.numel()), bool(torch.equal(x, val_tokens[s:e]))) for (x, _, _), (s, e) in
            zip(state["calls"], expected)] == [(e - s, True) for s, e in expected]
    adapting = sum(c + chunk < n - 1 for a, n in docs if n >= 32 for c in range(0, n - 1, chunk))
    assert sum(trained for *_, trained in state["calls"]) == adapting >= 6  # every chunk of a document but its last
    worst = max(abs(loss - losses[s:e].mean().item()) for (_, loss, _), (s, e) in zip(state["calls"], expected))
    assert worst < 2e-5, worst
    # Adapting matters here: without it (LR 0) the longest document's last chunks score otherwise.
    still = torch.zeros_like(losses)
    tg.evaluate_lora_ttt(tg.Hyperparameters({**env, "LORA_LR": "0"}), ours, val_tokens, luts, 0, 1, CPU,
                         losses=still)
    gap = max(abs(loss - still[s:e].mean().item()) for (_, loss, _), (s, e) in zip(state["calls"], expected))
    print(f"lora ttt: {len(expected)} scoring forwards, {adapting} adapting; worst {worst:.2e}, "
          f"without adapting {gap:.2e}")
    assert gap > 100 * worst
