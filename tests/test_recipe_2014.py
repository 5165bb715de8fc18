"""Our defaults compute what #2014's (openai/parameter-golf, the clean frontier; ../shared/reference/pr2014) model,
optimizer and training schedule compute, against its own code on the CPU: the parameter count its log prints, its
loss and every gradient on its weights (loop off and on, across documents), its asymmetric softcap, its progressive
context with the LR re-warm-up after each length change, its clip's norm to the last bit, and its bf16 Muon step with
the clip binding across a length change. Its model is #1855's plus the softcap's two parameters: the helpers of
test_recipe_model.py and test_recipe_optim.py take either module."""

import re
import sys
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import CPU, REFERENCE, pr1855_model, pr1855_settings, require_reference
from test_recipe_model import RECORD, TINY_OURS, TINY_RECORD, ours_from_record, tokens, varlen_sdpa
from test_recipe_optim import GradientLoss, StandIn, at, record_block, record_closure, record_slots, train_model_tree

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Its run's settings (seed-42 log) that its class defaults leave elsewhere, model and training; with #1855's RECORD.
RECORD_2014 = {**RECORD, "qk_gain_init": 5.25, "train_seq_len": 3072, "rope_train_seq_len": 3072,
               "train_seq_schedule": "1024@0.100,2048@0.700,3072@1.000", "seq_change_warmup_steps": 32,
               "gptq_reserve_seconds": 4.0, "warmdown_frac": 0.85, "beta2": 0.99, "min_lr": 0.1, "grad_accum_steps": 1}


@pytest.fixture
def record_2014(pr2014, monkeypatch):
    """Build its models with its asymmetric softcap (ASYM_LOGIT_RESCALE=1, as its run), its varlen attention with a
    backward on the CPU, its Newton-Schulz eager and its CUDA streams as no-ops."""
    from test_recipe_optim import NoStream
    monkeypatch.setenv("ASYM_LOGIT_RESCALE", "1")
    monkeypatch.setattr(pr2014, "flash_attn_varlen_func", varlen_sdpa)
    monkeypatch.setattr(pr2014, "zeropower_via_newtonschulz5", pr2014.zeropower_via_newtonschulz5.__wrapped__)
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda _: __import__("contextlib").nullcontext())
    return pr2014


def record_args(pr2014, **shape):
    return pr1855_settings(pr2014, **RECORD_2014, **shape)


def pair(pr2014, ours_env: dict, shape: dict):
    """(its GPT, our default GPT) on the same weights: its init, every parameter perturbed (as test_recipe_model's)."""
    torch.manual_seed(0)
    record = pr1855_model(pr2014, record_args(pr2014, **shape))
    for name, p in record.named_parameters():
        if not name.startswith("softcap"):
            p.data.add_((0.02 if p.ndim > 1 and p.numel() > 4096 else 0.3) * torch.randn_like(p))
    args = tg.Hyperparameters(ours_env)
    ours = tg.build_model(args, CPU)
    state = {n: t.reshape(1) if n.startswith("softcap") else t
             for n, t in ours_from_record(record.state_dict(), args.num_layers).items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"recur_active"}, (missing, unexpected)
    return record, ours


def compare(pr2014, record, ours, vocab: int, T: int, loop: bool, rows: int = 0) -> tuple[float, float]:
    """(loss difference, worst relative gradient difference) of its training forward and ours, across documents;
    with rows, one stream of rows x T tokens: ours as rows of T (TRAIN_STREAM), its one row cut every T tokens."""
    record.looping_active = loop
    ours.set_recurrence(loop)
    x, y, cu = tokens(vocab, T * max(rows, 1), True)
    if rows:
        cu = pr2014._build_cu_seqlens(cu[:-1].tolist(), x.numel(), CPU, T, 64)[0].unique()
    record.zero_grad(), ours.zero_grad()
    theirs = record(x, y, cu_seqlens=cu, max_seqlen=T)
    mine = (ours(x.view(rows, T), y.view(rows, T), True) if rows else ours(x, y)).mean()
    theirs.backward(), mine.backward()
    grads = ours_from_record({n: p.grad for n, p in record.named_parameters()}, len(ours.blocks))
    own = dict(ours.named_parameters())
    assert set(grads) == set(own)
    # Neither side trains the softcap's parameters: no gradient reaches them.
    assert all(grads[n] is None and own[n].grad is None for n in ("softcap_pos", "softcap_neg"))
    return abs(mine.item() - theirs.item()), max(((p.grad - grads[n]).abs().max() / grads[n].abs().max()).item()
                                                 for n, p in own.items() if p.grad is not None)


def test_default_parameter_count_is_2014s():
    """35,945,673: its seed-42 log's model_params (#1855's 35,945,671 plus softcap_pos and softcap_neg)."""
    require_reference(REFERENCE / "pr2014" / "train_seed42.log")
    logged = int(re.search(r"^model_params:(\d+)$", (REFERENCE / "pr2014" / "train_seed42.log").read_text(), re.M)[1])
    with torch.device("meta"):
        count = lambda env: sum(p.numel() for p in tg.GPT(tg.Hyperparameters(env)).parameters())  # noqa: E731
        assert count({}) == logged == 35_945_673
        assert count({"STACK": "1855"}) == count({"STACK": "1.0611"}) == 35_945_671


@pytest.mark.parametrize("loop", [False, True])
def test_tiny_forward_and_gradients_equal_2014s(record_2014, loop):
    record, ours = pair(record_2014, TINY_OURS, TINY_RECORD)
    loss_diff, grad_diff = compare(record_2014, record, ours, 128, 64, loop)
    print(f"tiny loop={loop}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-4


@pytest.mark.slow
def test_full_shape_forward_and_gradients_equal_2014s(record_2014):
    """Our defaults (no env at all) against its run's model, loop on, 256 tokens across documents."""
    record, ours = pair(record_2014, {}, {})
    loss_diff, grad_diff = compare(record_2014, record, ours, 8192, 256, True)
    print(f"full loop=True: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-4


def test_asymmetric_softcap_is_2014s_eval_path(record_2014):
    """With the two caps moved apart (0.5 and 2; the tiny model's logits are small), our loss is the cross-entropy of its forward_logits (the path its
    evaluation and TTT take); at their value LOGIT_SOFTCAP, bit for bit the symmetric softcap's (SOFTCAP_ASYM=0)."""
    record, ours = pair(record_2014, TINY_OURS, TINY_RECORD)
    record.looping_active = True
    ours.set_recurrence(True)
    x, y, cu = tokens(128, 64, True)
    symmetric = tg.build_model(tg.Hyperparameters({**TINY_OURS, "SOFTCAP_ASYM": "0"}), CPU)
    symmetric.load_state_dict({n: t for n, t in ours.state_dict().items() if not n.startswith("softcap")})
    with torch.no_grad():
        assert torch.equal(ours(x, y), symmetric(x, y))
        for model in (record, ours):
            model.softcap_pos.fill_(0.5), model.softcap_neg.fill_(2.0)
        logits = record.forward_logits(x, cu_seqlens=cu, max_seqlen=64)
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        assert abs(ours(x, y).mean().item() - theirs.item()) < 1e-5
        assert (ours(x, y) - symmetric(x, y)).abs().max() > 1e-2  # the caps matter once apart


def test_clip_norm_is_2014s_to_the_last_bit(record_2014):
    """Its gradients copied into our GPT: the norm our clip takes (GPT.clip_order) is torch's clip_grad_norm_ over its
    parameters, bit for bit; our previous sum (squares per shape group) is not."""
    record, ours = pair(record_2014, TINY_OURS, TINY_RECORD)
    record.looping_active = True
    x, y, cu = tokens(128, 64, True)
    (1e3 * record(x, y, cu_seqlens=cu, max_seqlen=64)).backward()
    for name, g in ours_from_record({n: p.grad for n, p in record.named_parameters()}, 6).items():
        dict(ours.named_parameters())[name].grad = None if g is None else g.clone()
    theirs = torch.nn.utils.clip_grad_norm_([p for p in record.parameters() if p.requires_grad], 0.3)
    ordered = tg.clip_grad_norm_global([], [torch.zeros(1)], 1e9, ours.clip_order())
    summed = tg.clip_grad_norm_global([p.grad for p in ours.parameters() if p.grad is not None], [], 1e9)
    assert theirs > 0.3 and ordered.item() == theirs.item() and summed.item() != theirs.item()


def stage_block(pr2014, h):
    """Its training loop's statements that pick the stage's length and the LR scale (lr_mul times the re-warm-up),
    as a function of (step, elapsed_ms, the length so far, the re-warm-up's start) returning its locals."""
    loop = next(n for n in train_model_tree(pr2014).body if isinstance(n, __import__("ast").While))
    budget = 1e3 * (h.max_wallclock_seconds - h.gptq_reserve_seconds)
    return record_block(pr2014, loop, lambda src: src.startswith(("stage_seq_len, frac", "if stage_seq_len !=",
                                                                   "scale = lr_mul(", "if seq_change_warmup_start")),
                        "step, elapsed_ms, active_train_seq_len, seq_change_warmup_start_step", h=h,
                        train_seq_plan=pr2014.parse_train_seq_schedule(h.train_seq_schedule, h.train_seq_len),
                        max_wallclock_ms=budget, log=lambda *a, **k: None,
                        lr_mul=record_closure(pr2014, "lr_mul", h=h, max_wallclock_ms=budget))


def our_stage(args, t, step: int, ms: float) -> float:
    """Our training loop's part: apply_switches on a clock at (step, ms), then the LR scale train() computes."""
    clock = SimpleNamespace(step=step, ms=ms, fraction=lambda: max(step / args.iterations, ms / tg.train_budget_ms(args)))
    tg.apply_switches(SimpleNamespace(args=args, log=lambda *a, **k: None), t, clock)
    return tg.lr_multiplier(args, step, ms) * tg.rewarm_multiplier(args, t, step)


def test_progressive_context_and_rewarmup_are_2014s(record_2014):
    """Step by step over a 600 s run of 400 steps: the same length (1024 to 10%, 2048 to 70%, then 3072) and the
    same LR scale, through both 32-step re-warm-ups and the warmdown."""
    args, h = tg.Hyperparameters({}), record_args(record_2014)
    block = stage_block(record_2014, h)
    t = SimpleNamespace(seq_len=0, switched={}, base_model=SimpleNamespace(set_recurrence=lambda on: None))
    length, start, seen = 1024, None, []
    for step in range(400):
        ms = step * 1490.0
        theirs = block(step, ms, length, start)
        length, start = theirs["active_train_seq_len"], theirs["seq_change_warmup_start_step"]
        assert our_stage(args, t, step, ms) == pytest.approx(theirs["scale"], rel=1e-12) and t.seq_len == length
        seen.append((length, round(theirs["scale"], 4)))
    print(seen[38:44], seen[278:284])
    assert [n for n, _ in seen].count(1024) == 41 and seen[41] == (2048, round(1 / 32, 4))
    assert (seen[280][0], seen[281][0]) == (2048, 3072)  # 70% exactly is still the 2048 stage
    assert tg.stage_seq_len(args, 0.1) == 1024 and tg.stage_seq_len(args, 0.1001) == 2048


def test_bf16_steps_with_a_binding_clip_across_a_length_change_are_2014s(record_2014):
    """Its step_fn and our train_step on its tiny model's tensors (bf16 Muon, its AdamW groups) over 8 steps that cross
    the change to 2048 tokens at 10% (the LR re-warmed from 1/32), gradients of norm ~190 clipped to 0.3 on every
    step: every tensor equal to fp32 rounding (as the unclipped bf16 test of test_recipe_optim.py)."""
    from test_recipe_optim import TINY
    args = tg.Hyperparameters({"STACK": "2014"})
    h = record_args(record_2014, **{k: v for k, v in TINY.items() if k not in RECORD_2014})
    torch.manual_seed(0)
    model = pr1855_model(record_2014, h)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    theirs = record_2014.Optimizers(h, model)
    slots = record_slots(theirs)
    clip_params = [p for p in model.parameters() if p.requires_grad]
    trained = [p for p in clip_params if any(p is q for q, _ in slots)]

    class Ordered(StandIn):  # our optimizers' stand-in, its gradients read in the record's parameter order
        def clip_order(self):
            ts = list(self.tensors)
            groups = [[k for k, (q, _) in enumerate(slots) if q is p] for p in clip_params]
            return [torch.cat([ts[k].grad.flatten() for k in ks]) for ks in groups if ks]

    ours = Ordered(theirs)
    optimizers, muon = tg.build_optimizers(args, ours)
    their_fake, our_fake = GradientLoss(trained, 4), GradientLoss(list(ours.tensors), 2)
    step_fn = record_closure(record_2014, "step_fn", h=h, device=CPU, model=their_fake, train_loader=their_fake,
                             optimizers=theirs, _clip_params=clip_params, active_train_seq_len=1024)
    run = SimpleNamespace(args=args, grad_accum_steps=1, distributed=False, device=CPU)
    t = SimpleNamespace(optimizers=optimizers, muon=muon, model=our_fake, loader=our_fake, base_model=ours, seq_len=0,
                        switched={})
    block, length, start = stage_block(record_2014, h), 1024, None
    for k, step in enumerate(range(55, 63)):
        ms = step * 1050.0  # 10% of 596 s is passed at step 57
        gen.manual_seed(100 + k)
        grads = {id(p): torch.randn(p.shape, generator=gen) for p in trained}
        their_fake.grads = [grads[id(p)] for p in trained]
        our_fake.grads = [at(s, grads) for s in slots]
        state = block(step, ms, length, start)
        length, start = state["active_train_seq_len"], state["seq_change_warmup_start_step"]
        step_fn(step, state["scale"])
        tg.train_step(run, t, our_stage(args, t, step, ms), tg.muon_momentum(args, step))
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        diff = max((at(s) - p.detach()).abs().max().item() for s, p in zip(slots, ours.tensors))
        print(f"step {step} seq_len {length} scale {state['scale']:.4f} norm {norm:.0f} diff {diff:.2e}")
        assert norm > 100 and t.seq_len == length and diff < 3e-7
    assert length == 2048 and start == 57


class RandomTokens:
    """A train loader of random tokens (BOS among them) in rows of the asked length; no position to restore."""

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int):
        return torch.randint(0, 32, (2, global_tokens // seq_len, seq_len)).unbind()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_progressive_context_compiles_each_length_in_the_warm_up_only():
    """Compiled (aot_eager: Dynamo's graphs without inductor's CPU codegen), the warm-up runs each length of
    TRAIN_SEQ_SCHEDULE once and compiles one graph per length; then the whole run, through both length changes and
    the loop's switch, compiles nothing more, and the warm-up's weights are undone."""
    env = {**TINY_OURS, "VOCAB_SIZE": "32", "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "16@0.3,32@0.6,64@1.0",
           "TRAIN_BATCH_TOKENS": "128", "GRAD_ACCUM_STEPS": "1", "WARMUP_STEPS": "1", "ITERATIONS": "10",
           "MAX_WALLCLOCK_SECONDS": "0", "RECUR_START_FRAC": "0.5"}
    args = tg.Hyperparameters(env)
    torch.manual_seed(0)
    base = tg.build_model(args, CPU)
    optimizers, muon = tg.build_optimizers(args, base)
    model = torch.compile(base, backend="aot_eager", dynamic=False, fullgraph=True)
    t = tg.Training(base, model, optimizers, muon, RandomTokens(), None, seq_len=args.seq_stages[0][0])
    run = SimpleNamespace(args=args, grad_accum_steps=1, distributed=False, device=CPU, log=lambda *a, **k: None)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    start = graphs()
    tg.warm_up_training(run, t)
    assert graphs() == start + 3 and t.seq_len == 16
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    seen = []
    for step in range(10):
        clock = SimpleNamespace(step=step, ms=0.0, fraction=lambda: step / 10)
        tg.apply_switches(run, t, clock)
        tg.train_step(run, t, tg.rewarm_multiplier(args, t, step), 0.9)
        seen.append((t.seq_len, base.recur_active.item()))
    assert graphs() == start + 3
    assert [n for n, _ in seen] == [16] * 4 + [32] * 3 + [64] * 3 and seen[4][1] is False and seen[5][1] is True


@pytest.mark.slow
def test_a_run_follows_the_schedule_and_logs_each_change(tiny_data, tmp_path):
    """A whole (tiny) run by steps: the warm-up step runs each length, each change is logged once at its step, and the
    run finishes with an artifact score."""
    from conftest import data_env, run_train
    env = data_env(tiny_data, RUN_ID="sched", TRAIN_SEQ_SCHEDULE="16@0.3,32@0.6,64@1.0", WARMUP_STEPS="1",
                   ITERATIONS="10", SEQ_CHANGE_WARMUP_STEPS="2")
    run_train(tmp_path, env)
    log = (tmp_path / "logs" / "sched.txt").read_text()
    assert re.findall(r"^warmup_step:\d/3 seq_len:(\d+)$", log, re.M) == ["16", "32", "64"]
    assert re.findall(r"^seq_len:(\d+) step:(\d+)/10 ", log, re.M) == [("32", "4"), ("64", "7")]
    assert re.search(r"^final_\w+_exact val_loss:\S+ val_bpb:\S+$", log, re.M)


def test_defaults_are_2014s_logged_training_settings():
    """Every model and training setting of its seed-42 log that we share by name (lower-case) equals our default: the
    optimizer's (unchanged from #1855), the QK gain, the context and its schedule, the re-warm-up, the GPTQ reserve."""
    from test_recipe_optim import SHARED
    require_reference(REFERENCE / "pr2014" / "train_seed42.log")
    logged = dict(re.findall(r"^  (\w+): (.*)$", (REFERENCE / "pr2014" / "train_seed42.log").read_text(), re.M))
    args = tg.Hyperparameters({})
    names = [*SHARED, "warmup_steps", "qk_gain_init", "train_seq_len", "seq_change_warmup_steps", "logit_softcap",
             "train_batch_tokens", "num_layers", "model_dim", "tied_embed_init_std", "rope_dims", "xsa_last_n"]
    assert {n: float(logged[n]) for n in names} == {n: float(getattr(args, n)) for n in names}
    assert logged["train_seq_schedule"] == args.train_seq_schedule and logged["rope_train_seq_len"] == "3072"
    assert logged["train_seq_schedule_mode"] == "wallclock" and logged["compile_shape_warmup"] == "True"
