"""The 1.0611 record's (#1855) optimizer step and schedules, checked against its own code on the CPU: Polar Express
Newton-Schulz, its Muon (row normalization, Nesterov momentum, shape scale, weight decay), its two AdamW groups, the
global gradient clip, the LR multiplier with its MIN_LR floor, the Muon momentum warm-up and the EMA.

The record banks same-shape matrices into 3-D parameters (qo_bank, kv_bank, mlp_up_bank, mlp_down_bank); its Muon
orthogonalizes each bank[i] on its own, as ours does each per-layer matrix. Ours runs here on a stand-in module
that holds the record's tensors unbanked (bank[i] -> one matrix) in the record's optimizer groups: which of our
GPT's parameters fall in which group is the model's part (GPT.param_groups). The record's schedules and training
step live inside its train_model as closures and inline blocks: they are compiled from its source and run as is."""

import ast
import contextlib
import inspect
import re
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train_gpt as tg
from conftest import CPU, pr1855_model, pr1855_settings

# The env values under which our optimizer step and schedules are the record's: its defaults and its README's
# reproduce command (MATRIX_LR=0.026 MIN_LR=0.1 GRAD_CLIP_NORM=0.3 WARMUP_STEPS=20 MUON_BACKEND_STEPS=5
# WARMDOWN_FRAC=0.85 BETA2=0.99 GPTQ_RESERVE_SECONDS=0.5 ITERATIONS=20000 MAX_WALLCLOCK_SECONDS=600).
RECIPE_OPTIM = {
    "MATRIX_LR": "0.026", "TIED_EMBED_LR": "0.03", "SCALAR_LR": "0.02",
    "MUON_MOMENTUM": "0.97", "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500",
    "MUON_BACKEND_STEPS": "5", "MUON_NS_COEFFS": "polar_express_plain", "MUON_ROW_NORM": "1", "MUON_BF16": "1",
    "MUON_POST_NS_ROW_NORM": "0", "NORMUON_BETA2": "0",
    "BETA1": "0.9", "BETA2": "0.99", "ADAM_EPS": "1e-8",
    "MUON_WD": "0.095", "ADAM_WD": "0.02", "EMBED_WD": "0.085", "CAUTIOUS_WD": "0", "GRAD_CLIP_NORM": "0.3",
    "ITERATIONS": "20000", "MAX_WALLCLOCK_SECONDS": "600", "GPTQ_RESERVE_SECONDS": "0.5",
    "WARMDOWN_FRAC": "0.85", "MIN_LR_FRAC": "0", "MIN_LR": "0.1", "WARMUP_STEPS": "20",
    "EMA_DECAY": "0.9965", "EMA_WARMUP": "0",
}
# The record with every parameter kind of its recipe (parallel lanes, skip gates, the sparse attention gate,
# SmearGate) and one micro-batch per step (its default is 8 // world_size): at its full shape, and tiny.
FULL = dict(sparse_attn_gate_enabled=True, smear_gate_enabled=True, grad_accum_steps=1)
TINY = dict(FULL, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64, xsa_last_n=3, loop_start=1,
            loop_end=1, parallel_start_layer=2, gate_window=4)
# Our settings that the record has under the same (lower-case) name.
SHARED = ("matrix_lr tied_embed_lr scalar_lr muon_momentum muon_momentum_warmup_start muon_momentum_warmup_steps "
          "muon_backend_steps beta1 beta2 adam_eps muon_wd adam_wd embed_wd grad_clip_norm iterations "
          "max_wallclock_seconds gptq_reserve_seconds warmdown_frac min_lr ema_decay").split()


def recipe_args(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({**RECIPE_OPTIM, **{k: str(v) for k, v in env.items()}})


def record_settings(pr1855, args: tg.Hyperparameters, shape=TINY):
    """The record's Hyperparameters at a shape with our optimizer settings."""
    return pr1855_settings(pr1855, **shape, **{n: getattr(args, n) for n in SHARED}, muon_row_normalize=args.muon_row_norm)


# -----------------------------
# The record's code, run as it is
# -----------------------------

def train_model_tree(pr1855) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(pr1855.train_model))).body[0]


def _compile(pr1855, node: ast.FunctionDef, free: dict):
    # The names a closure reads from train_model's frame become globals of its namespace, beside the module's.
    namespace = {**vars(pr1855), **free}
    exec(compile(ast.fix_missing_locations(ast.Module([node], [])), f"<pr1855 {node.name}>", "exec"), namespace)
    return namespace[node.name]


def record_def(pr1855, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(train_model_tree(pr1855)) if isinstance(n, ast.FunctionDef) and n.name == name)


def record_closure(pr1855, name: str, **free):
    """A function defined inside the record's train_model (training_frac, lr_mul, step_fn), compiled on its own."""
    return _compile(pr1855, record_def(pr1855, name), free)


def record_block(pr1855, within: ast.AST, select, params: str = "", **free):
    """The statements of `within` that select(source) picks, in order, as a function of params returning its
    locals."""
    node = ast.parse(f"def block({params}):\n    return locals()").body[0]
    picked = [s for s in within.body if select(ast.unparse(s))]
    assert picked, "the record's source changed: nothing selected"
    node.body[:0] = picked
    return _compile(pr1855, node, free)


class NoStream:
    """A CUDA stream as a no-op: the record's Optimizers steps its AdamWs on a side stream."""

    def wait_stream(self, _):
        pass


@pytest.fixture
def record_on_cpu(monkeypatch, pr1855):
    """The record's Optimizers on the CPU: streams as no-ops, its Newton-Schulz eager (it is torch.compile'd;
    ours runs eager with COMPILE=0, the CPU default)."""
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda _: contextlib.nullcontext())
    monkeypatch.setattr(pr1855, "zeropower_via_newtonschulz5", pr1855.zeropower_via_newtonschulz5.__wrapped__)
    return monkeypatch


def record_in_fp32(monkeypatch):
    """The record's Muon in fp32: its casts to bf16 (the gradient, the Newton-Schulz input) become no-ops."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t)


# -----------------------------
# Our optimizers on the record's tensors
# -----------------------------

def record_slots(record_optimizers) -> list[tuple[nn.Parameter, int | None]]:
    """The record's optimized tensors as (parameter, bank index or None): each bank unbanked, then the tied
    embedding, then the scalars, in its optimizers' order."""
    group = lambda opt: opt.param_groups[0]["params"]  # noqa: E731
    return [*((bank, i) for bank in group(record_optimizers.optimizer_muon) for i in range(bank.shape[0])),
            *((p, None) for p in group(record_optimizers.optimizer_tok) + group(record_optimizers.optimizer_scalar))]


def at(slot, tensors=None) -> torch.Tensor:
    """A slot's tensor: of the parameter itself, or of tensors[id(parameter)] (its gradient)."""
    p, i = slot
    t = p.detach() if tensors is None else tensors[id(p)]
    return t if i is None else t[i]


class StandIn(nn.Module):
    """Our optimizers' view of a model: one parameter per record slot (bank[i] -> a matrix) in the record's groups
    (banks -> matrix, tied embedding -> embed, scalars -> scalar), our GPT's learning rates and decays per group."""

    learning_rates = tg.GPT.learning_rates
    weight_decays = tg.GPT.weight_decays

    def __init__(self, record_optimizers):
        super().__init__()
        slots = record_slots(record_optimizers)
        self.tensors = nn.ParameterList(nn.Parameter(at(s).clone()) for s in slots)
        ts, m = list(self.tensors), sum(i is not None for _, i in slots)
        e = m + len(record_optimizers.optimizer_tok.param_groups[0]["params"])
        self.groups = {"matrix": ts[:m], "embed": ts[m:e], "head": [], "scalar": ts[e:]}

    def param_groups(self):
        return self.groups

    def after_optimizer_step(self):
        pass


class GradientLoss:
    """A 'model' and 'loader' in one: the loss sum(p * G) leaves exactly G in each p.grad on backward; a batch is
    `fields` Nones (the record's loader returns 4 things, ours 2)."""

    def __init__(self, params, fields):
        self.params, self.fields, self.grads = params, fields, None

    def __call__(self, *_, **__):
        return sum((p * g).sum() for p, g in zip(self.params, self.grads))

    def next_batch(self, *_):
        return (None,) * self.fields


def run_steps(pr1855, args, schedule, shape=TINY):
    """The record's training step and ours over schedule [(step, elapsed_ms, gradient scale)] from the same weights
    and gradients: its step_fn with lr_mul(training_frac(step, ms)), ours train_step with lr_multiplier and
    muon_momentum. Returns per step (max abs difference over all tensors, their/our LR multiplier and momentum,
    the gradients' global norm)."""
    h = record_settings(pr1855, args, shape)
    torch.manual_seed(0)
    model = pr1855_model(pr1855, h)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init: zero-initialized gates and projections get weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    theirs = pr1855.Optimizers(h, model)
    slots = record_slots(theirs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Every trainable tensor in exactly one of its groups: its clip (over all of them) and ours see the same set.
    assert {id(p) for p, _ in slots} == {id(p) for p in trainable}
    ours = StandIn(theirs)
    optimizers, muon = tg.build_optimizers(args, ours)

    max_ms = 1e3 * (h.max_wallclock_seconds - h.gptq_reserve_seconds) if h.max_wallclock_seconds > 0 else None
    training_frac = record_closure(pr1855, "training_frac", h=h, max_wallclock_ms=max_ms)
    lr_mul = record_closure(pr1855, "lr_mul", h=h)
    their_fake, our_fake = GradientLoss(trainable, 4), GradientLoss(list(ours.tensors), 2)
    step_fn = record_closure(pr1855, "step_fn", h=h, device=CPU, model=their_fake, train_loader=their_fake,
                             optimizers=theirs, _clip_params=trainable)
    run = SimpleNamespace(args=args, grad_accum_steps=1, distributed=False, device=CPU)
    t = SimpleNamespace(optimizers=optimizers, muon=muon, model=our_fake, loader=our_fake, base_model=ours,
                        seq_len=args.train_seq_len)
    out = []
    for k, (step, ms, scale) in enumerate(schedule):
        gen.manual_seed(100 + k)
        grads = {id(p): scale * torch.randn(p.shape, generator=gen) for p in trainable}
        their_fake.grads = [grads[id(p)] for p in trainable]
        our_fake.grads = [at(s, grads) for s in slots]
        their_lr = lr_mul(training_frac(step, ms))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "CUDA is not available")  # its autocast: off on a CPU
            step_fn(step, their_lr)
        our_lr, our_momentum = tg.lr_multiplier(args, step, ms), tg.muon_momentum(args, step)
        tg.train_step(run, t, our_lr, our_momentum)
        diff = max((at(s) - p.detach()).abs().max().item() for s, p in zip(slots, ours.tensors))
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        out.append((diff, their_lr, our_lr, theirs.optimizer_muon.param_groups[0]["momentum"], our_momentum, norm))
    return out


# A schedule through the Muon momentum warm-up (0.92 at step 0, 0.945 at 750, 0.97 from 1500) and the warmdown by
# time (from 15% of the 599.5 s budget) down to the MIN_LR floor of 0.1 (multipliers 0.019 and 0.001 without it).
SCHEDULE = [(0, 0.0), (1, 120.0), (750, 3e5), (1500, 5e5), (4900, 5.9e5), (4901, 5.99e5)]


# -----------------------------
# Newton-Schulz
# -----------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_polar_express_plain_is_the_records_newton_schulz(pr1855, monkeypatch, dtype):
    """Bit for bit, in bf16 (the record's on every device, ours on GPU or under MUON_BF16) and in fp32 (ours on a
    CPU; the record's bf16 cast off): wide, tall, square and batched (a bank) inputs. modded-nanogpt's form
    (polar_express: the norm x 1.02, c scaling A rather than A @ A) is another function in either precision."""
    if dtype == torch.float32:
        record_in_fp32(monkeypatch)
    theirs = pr1855.zeropower_via_newtonschulz5.__wrapped__
    gen = torch.Generator().manual_seed(0)
    for shape in [(32, 32), (16, 32), (128, 32), (32, 128), (3, 16, 32)]:
        G = torch.randn(shape, generator=gen)
        expected = theirs(G, steps=5)
        assert expected.dtype == dtype
        assert torch.equal(tg.zeropower_via_newtonschulz5(G.to(dtype), 5, coeffs="polar_express_plain"), expected)
        assert not torch.equal(tg.zeropower_via_newtonschulz5(G.to(dtype), 5, coeffs="polar_express"), expected)


@pytest.mark.slow
def test_compiled_polar_express_plain_is_the_records_compiled(pr1855):
    """Compiled by inductor (on the CPU here; on GPU both are compiled too): ours as Muon compiles it, the record's
    as its @torch.compile leaves it, on bf16 inputs as its step gives them. Bit for bit (an fp32 input, cast
    inside its graph, would differ by 0.035: the cast fuses differently)."""
    ours = torch.compile(tg.zeropower_via_newtonschulz5, dynamic=False, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for shape in [(6, 32, 32), (3, 128, 32)]:
        G = torch.randn(shape, generator=gen).bfloat16()
        assert torch.equal(ours(G, 5, 1e-7, "polar_express_plain"), pr1855.zeropower_via_newtonschulz5(G, steps=5))


# -----------------------------
# The whole step
# -----------------------------

def test_recipe_step_is_the_records_in_bf16(pr1855, record_on_cpu):
    """MUON_BF16=1: the record's Muon numerics (bf16 momentum, row norm and Newton-Schulz) with its AdamW groups,
    six steps along SCHEDULE from the same weights and gradients, the gradients' norm under the 0.3 clip (a clipped
    gradient is the fp32 test's: the two clips' norms differ in the last bit, and bf16 Newton-Schulz turns one bf16
    rounding flipped by it into a visible difference). Every tensor equal to fp32 rounding (seen: 1.2e-7, an ulp of
    weights near 1: the weight decay and its fused AdamW against our foreach one round in another order)."""
    rows = run_steps(pr1855, recipe_args(), [(step, ms, 1e-3) for step, ms in SCHEDULE])
    for diff, their_lr, our_lr, their_momentum, our_momentum, norm in rows:
        assert norm < 0.3
        assert our_lr == pytest.approx(their_lr, rel=1e-12) and our_momentum == pytest.approx(their_momentum, rel=1e-12)
        assert diff < 3e-7
    assert [round(r[1], 4) for r in rows] == [1.0, 1.0, 0.5877, 0.1953, 0.1, 0.1]
    assert [r[3] for r in rows][::2] == pytest.approx([0.92, 0.945, 0.97])


@pytest.mark.slow
def test_recipe_step_is_the_records_at_full_shape(pr1855, record_on_cpu):
    """As test_recipe_step_is_the_records_in_bf16, at the record's shape (35,945,671 parameters; banks of 22 x
    512 x 512, 22 x 256 x 512, 11 x 2048 x 512, 11 x 512 x 2048): the first three steps of SCHEDULE."""
    args = recipe_args()
    # The count its seed-42 log prints (35,944,602, in ../shared/reference/README.md, is its defaults: no gates).
    assert sum(p.numel() for p in pr1855_model(pr1855, record_settings(pr1855, args, FULL)).parameters()) == 35_945_671
    rows = run_steps(pr1855, args, [(step, ms, 1e-5) for step, ms in SCHEDULE[:3]], shape=FULL)
    for diff, *_, norm in rows:
        assert norm < 0.3 and diff < 3e-7


def test_recipe_step_with_clipping_is_the_records_in_fp32(pr1855, record_on_cpu):
    """MUON_BF16=0 (our fp32 momentum and, on a CPU, fp32 Newton-Schulz) against the record with its bf16 casts off:
    gradients of norm ~190 clipped to 0.3 on every step along SCHEDULE. Every tensor equal to fp32 rounding (seen:
    1.2e-7)."""
    record_in_fp32(record_on_cpu)
    rows = run_steps(pr1855, recipe_args(MUON_BF16=0), [(step, ms, 1.0) for step, ms in SCHEDULE])
    for diff, *_, norm in rows:
        assert norm > 100
        assert diff < 1e-6


# -----------------------------
# Schedules and the EMA
# -----------------------------

@pytest.mark.parametrize("env", [{}, {"MIN_LR": 0}, {"MAX_WALLCLOCK_SECONDS": 0}, {"WARMDOWN_FRAC": 0.3, "MIN_LR": 0.5}])
def test_lr_multiplier_is_the_records(pr1855, env):
    """Ours against its lr_mul(training_frac(step, elapsed_ms)) from the start to past the end of the run, by time
    (600 s less the GPTQ reserve) and by steps (MAX_WALLCLOCK_SECONDS=0), with and without the MIN_LR floor."""
    args = recipe_args(**env)
    h = record_settings(pr1855, args)
    budget_ms = 1e3 * (h.max_wallclock_seconds - h.gptq_reserve_seconds)
    training_frac = record_closure(pr1855, "training_frac", h=h, max_wallclock_ms=budget_ms if budget_ms > 0 else None)
    lr_mul = record_closure(pr1855, "lr_mul", h=h)
    seen = set()
    for k in range(205):
        frac = k / 200
        step, ms = round(frac * args.iterations), frac * budget_ms
        expected = lr_mul(training_frac(step, ms))
        assert tg.lr_multiplier(args, step, ms) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        seen.add(round(expected, 6))
    assert 1.0 in seen and args.min_lr in seen and len(seen) > 20


@pytest.mark.parametrize("warmup_steps", [1500, 10, 0])
def test_muon_momentum_is_the_records(pr1855, warmup_steps):
    """Its step_fn's momentum block, run on every step from 0 on a group holding MUON_MOMENTUM (as the warm-up's
    restore leaves it): it sets the momentum only up to the warm-up's end, which ours computes for every step."""
    args = recipe_args(MUON_MOMENTUM_WARMUP_STEPS=warmup_steps)
    h = record_settings(pr1855, args)
    group = {"momentum": h.muon_momentum}
    block = record_block(pr1855, record_def(pr1855, "step_fn"), lambda src: "muon_momentum_warmup_steps" in src,
                         "step", h=h, optimizers=SimpleNamespace(optimizer_muon=SimpleNamespace(param_groups=[group])))
    for step in range(3001):
        block(step)
        assert tg.muon_momentum(args, step) == pytest.approx(group["momentum"], rel=1e-12)
    assert group["momentum"] == 0.97 and tg.muon_momentum(args, 0) == (0.97 if warmup_steps == 0 else 0.92)


def test_ema_is_the_records(pr1855):
    """EMA_WARMUP=0: its EMA (made from the state dict after the warm-up's restore, updated after every step with
    the decay 0.9965 from the first step, loaded into the model at the end) and ours, on two copies of its model
    moved alike after each of 20 steps: equal to fp32 rounding (seen 7.6e-7 of a tensor's largest value, 8 ulps of
    q_gain's 5.0: ours lerps, it multiplies and adds, and an EMA keeps each step's rounding).
    Our default EMA_WARMUP=1 averages the first steps far harder."""
    args = recipe_args()
    h = record_settings(pr1855, args)
    theirs = pr1855_model(pr1855, h)
    ours, warmed = (pr1855_model(pr1855, h) for _ in range(2))
    ours.load_state_dict(theirs.state_dict()), warmed.load_state_dict(theirs.state_dict())
    tree = train_model_tree(pr1855)
    state = record_block(pr1855, tree, lambda src: src.split(" =")[0] in ("_live_state", "ema_state", "_ema_pairs",
                                                                           "ema_decay"), base_model=theirs, h=h)()
    loop = next(n for n in tree.body if isinstance(n, ast.While))
    update = record_block(pr1855, loop, lambda src: "_ema_pairs" in src, _ema_pairs=state["_ema_pairs"],
                          ema_decay=state["ema_decay"])
    apply = record_block(pr1855, tree, lambda src: src.startswith(("current_state =", "avg_state =",
                                                                    "base_model.load_state_dict(avg_state")),
                         base_model=theirs, ema_state=state["ema_state"])
    emas = [tg.WeightEMA(ours, args.ema_decay, args.ema_warmup), tg.WeightEMA(warmed, args.ema_decay)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            for ps in zip(theirs.parameters(), ours.parameters(), warmed.parameters()):
                noise = 0.1 * torch.randn(ps[0].shape, generator=gen)
                for p in ps:
                    p.add_(noise)
        update()
        for ema in emas:
            ema.update()
    apply()
    for ema in emas:
        ema.apply()
    def rel_diff(model):  # the largest difference per tensor over its largest value
        return max(((a - b).abs().max() / a.abs().max()).item()
                   for a, b in zip(theirs.state_dict().values(), model.state_dict().values()))

    assert rel_diff(ours) < 2e-6 and rel_diff(warmed) > 0.05


# -----------------------------
# Settings
# -----------------------------

def test_recipe_optim_is_the_records_configuration(pr1855):
    """RECIPE_OPTIM against the record's own: its Hyperparameters' defaults with its README's reproduce command
    applied (read from the README), and the settings its seed-42 log prints: every shared optimizer and schedule
    setting, and its warm-up steps."""
    readme = (Path(pr1855.__file__).parent / "README.md").read_text()
    command = readme.split("## Reproducing")[1].split("torchrun")[0]
    h, names = pr1855.Hyperparameters(), [*SHARED, "warmup_steps"]
    for name, value in re.findall(r"\b([A-Z0-9_]+)=(\S+)", command):
        if name.lower() in names:
            setattr(h, name.lower(), type(getattr(h, name.lower()))(value))
    args = recipe_args()
    assert {n: getattr(args, n) for n in names} == {n: getattr(h, n) for n in names}
    assert h.muon_row_normalize == args.muon_row_norm and h.tie_embeddings == args.tie_embeddings
    assert (h.min_lr, h.gptq_reserve_seconds, h.warmdown_frac) == (0.1, 0.5, 0.85)  # the command was read
    # The settings its seed-42 run logged: the same.
    logged = dict(re.findall(r"^  (\w+): (.+)$", (Path(pr1855.__file__).parent / "train_seed42.log").read_text(), re.M))
    assert {n: float(logged[n]) for n in names} == {n: float(getattr(args, n)) for n in names}
    assert logged["muon_row_normalize"] == "True"


def test_recipe_settings_and_the_defaults_of_the_new_ones():
    """RECIPE_OPTIM is a valid configuration and STACK=1855's; STACK=1.1194 keeps the earlier numerics: no embedding
    decay, MIN_LR=0 floors nothing, EMA_WARMUP=1, MUON_BF16=0."""
    args = recipe_args()
    assert (args.embed_wd, args.adam_wd, args.muon_wd, args.min_lr) == (0.085, 0.02, 0.095, 0.1)
    assert all(tg.Hyperparameters({"STACK": "1855"}).settings[k] == args.settings[k] for k in RECIPE_OPTIM)
    older = tg.Hyperparameters({"STACK": "1.1194"})
    assert (older.embed_wd, older.min_lr, older.ema_warmup, older.muon_bf16) == (0.0, 0.0, True, False)
    for name, value in (("MIN_LR", "1.5"), ("EMBED_WD", "-0.1"), ("MUON_NS_COEFFS", "polar")):
        with pytest.raises(tg.ConfigError, match=name):
            tg.Hyperparameters({name: value})
