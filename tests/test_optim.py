"""The OPTIMIZERS section on CPU: Newton-Schulz and Muon, each optimizer option (it changes the update and
training stays finite), weight decay, the LR schedule, the Muon momentum warm-up and the EMA."""

import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, tiny_args


def train_in_process(steps=6, **env):
    """A few optimizer steps of a tiny model memorizing one random batch: (losses, final parameters)."""
    args = tiny_args(ITERATIONS=6, WARMDOWN_ITERS=3, MAX_WALLCLOCK_SECONDS=0, MUON_MOMENTUM_WARMUP_STEPS=3, **env)
    torch.manual_seed(0)
    model = tg.build_model(args, CPU)
    optimizers, muon = tg.build_optimizers(args, model)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(steps):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = model(x, torch.roll(x, -1, 1)).mean()
        loss.backward()
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * tg.lr_multiplier(args, step, 0.0)
            opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


# -----------------------------
# Newton-Schulz and Muon
# -----------------------------


def test_newton_schulz_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        X = tg.zeropower_via_newtonschulz5(torch.randn(shape), steps=5)
        s = torch.linalg.svdvals(X)
        # The quintic's fixed point is a band around 1, not exactly 1 (modded-nanogpt).
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())


@pytest.mark.parametrize("coeffs", sorted(tg.NS_COEFFS))
def test_batched_newton_schulz_equals_per_matrix(coeffs):
    torch.manual_seed(0)
    for shape in [(4, 48, 32), (3, 32, 64), (2, 40, 40)]:
        G = torch.randn(shape)
        batched = tg.zeropower_via_newtonschulz5(G, 5, coeffs=coeffs)
        one_by_one = torch.stack([tg.zeropower_via_newtonschulz5(g, 5, coeffs=coeffs) for g in G])
        assert torch.allclose(batched, one_by_one, atol=1e-5), (coeffs, shape)

def test_polar_express_orthogonalizes_tighter_than_the_quintic():
    torch.manual_seed(0)
    G = torch.randn(64, 32) @ torch.diag(torch.logspace(-2, 0, 32))  # a spread spectrum, like real gradients
    s = {c: torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5, coeffs=c)) for c in tg.NS_COEFFS}
    assert (s["polar_express"] - 1).abs().max() < (s["quintic"] - 1).abs().max()
    assert s["polar_express"].min() > 0.5 and s["polar_express"].max() < 1.3


def test_muon_step_moves_along_orthogonalized_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    before = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.0, backend_steps=5)
    p.grad = torch.randn(32, 16)
    opt.step()
    update = (before - p.detach()) / 0.1 / math.sqrt(32 / 16)
    expected = tg.zeropower_via_newtonschulz5(p.grad, 5)
    assert torch.allclose(update, expected, atol=1e-5)


def muon_direction(o, steps=1, **options):
    p = torch.nn.Parameter(torch.zeros_like(o))
    muon = tg.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, **options)
    for _ in range(steps):
        d = muon._direction(p, o, muon.param_groups[0])
    return d / max(1, o.size(0) / o.size(1)) ** 0.5  # without the shape scale

@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_normuon_keeps_the_update_norm_and_post_ns_row_norm_gives_unit_rows(shape):
    torch.manual_seed(0)
    o = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of very different size
    d = muon_direction(o, steps=3, normuon_beta2=0.9)
    assert d.norm().item() == pytest.approx(o.norm().item(), rel=1e-5)
    assert not torch.allclose(d, o)
    rows = muon_direction(o, post_ns_row_norm=True).norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), rtol=1e-5)  # #1520's "NorMuon": every row to unit norm
    d = muon_direction(o, steps=3, normuon_beta2=0.9, post_ns_row_norm=True)  # then NorMuon keeps that total norm
    assert d.norm().item() == pytest.approx(shape[0] ** 0.5, rel=1e-5)

def test_normuon_normalizes_neurons_along_the_longer_side():
    torch.manual_seed(0)
    tall, wide = torch.randn(48, 16) * torch.rand(48, 1), torch.randn(16, 48) * torch.rand(1, 48)
    # One step with beta2=0 normalizes exactly: equal norms per row of a tall matrix, per column of a wide one.
    for o, dim in [(tall, 1), (wide, 0)]:
        n = muon_direction(o, normuon_beta2=1e-12).norm(dim=dim)
        assert torch.allclose(n, n.mean().expand_as(n), rtol=1e-4)

OPTIONS = [
    {"MUON_NS_COEFFS": "polar_express"}, {"MUON_ROW_NORM": "1"}, {"MUON_POST_NS_ROW_NORM": "1"},
    {"NORMUON_BETA2": "0.9"}, {"MUON_WD": "0.5"}, {"ADAM_WD": "0.5"}, {"MIN_LR_FRAC": "0.5"}, {"WARMDOWN_FRAC": "0.9"},
]

@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: ",".join(o))
def test_each_option_changes_the_update_and_training_stays_finite(option):
    base_losses, base = train_in_process()
    losses, params = train_in_process(**option)
    assert all(np.isfinite(losses)) and all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(base, params))
    assert losses[-1] < losses[0]

def test_cautious_weight_decay_decays_less_than_plain():
    _, base = train_in_process()
    _, plain = train_in_process(MUON_WD="0.5", ADAM_WD="0.5")
    _, cautious = train_in_process(MUON_WD="0.5", ADAM_WD="0.5", CAUTIOUS_WD="1")
    shrink = [sum((b.norm() - p.norm()).item() for b, p in zip(base, ps)) for ps in (plain, cautious)]
    assert shrink[0] > shrink[1] > 0

def test_cautious_decay_touches_only_weights_the_step_shrinks():
    p = torch.nn.Parameter(torch.tensor([[1.0, 1.0, -1.0, -1.0]]))
    opt = torch.optim.SGD([p], lr=0.1)
    tg.add_weight_decay(opt, 1.0, cautious=True)
    p.grad = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # steps: toward 0, away, away, toward 0
    opt.step()
    # Plain SGD gives [0.9, 1.1, -1.1, -0.9]; decay 0.1 x the old weight only where the step shrank |w|.
    assert torch.allclose(p.detach(), torch.tensor([[0.8, 1.1, -1.1, -0.8]]))

# -----------------------------
# Schedule and EMA
# -----------------------------


def test_lr_multiplier_warmdown_by_steps_and_by_time():
    args = tiny_args(ITERATIONS="100", WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="0")
    assert tg.lr_multiplier(args, 10, 0) == 1.0 and tg.lr_multiplier(args, 90, 0) == pytest.approx(0.5)
    args = tiny_args(WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="12", GPTQ="1", GPTQ_RESERVE_SECONDS="2")
    # 100 ms per step so far: 20 warmdown steps are the last 2 s of the 10 s budget (12 s less the GPTQ reserve).
    assert tg.lr_multiplier(args, 50, 5000) == 1.0
    assert tg.lr_multiplier(args, 90, 9000) == pytest.approx(0.5)


def test_warmdown_frac_and_lr_floor():
    args = tg.Hyperparameters({"ITERATIONS": "100", "WARMDOWN_FRAC": "0.4", "MIN_LR_FRAC": "0.1",
                               "MAX_WALLCLOCK_SECONDS": "0"})
    assert tg.lr_multiplier(args, 50, 0) == 1.0
    assert tg.lr_multiplier(args, 80, 0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert tg.lr_multiplier(args, 100, 0) == pytest.approx(0.1)
    args = tg.Hyperparameters({"WARMDOWN_FRAC": "0.5", "MAX_WALLCLOCK_SECONDS": "10", "GPTQ": "0"})
    assert tg.lr_multiplier(args, 3, 4000) == 1.0 and tg.lr_multiplier(args, 7, 7500) == pytest.approx(0.5)

def test_ema_averages_every_step_and_apply_copies_the_average_in():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args(), CPU)
    ema = tg.WeightEMA(model, 0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 13):  # the decay warms up as n / (n + 9) and reaches 0.5 at the 9th update
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.5, n / (n + 9))
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
    ema.apply()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k


def test_bf16_momentum_stays_bf16_through_a_state_restore():
    # load_state_dict casts optimizer state to the (fp32) parameters' dtype; warm-up's restore and a resume do it.
    # The restored run must step exactly as the uninterrupted one.
    args = tiny_args(BASELINE=0, STACK="1.1194", MUON_BF16=1, NUM_LAYERS=2, ROPE_DIMS=4)
    x = torch.randint(0, args.vocab_size, (2, 16))

    def run(restore: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = tg.build_model(args, CPU)
        optimizers, muon = tg.build_optimizers(args, model)
        for step in range(3):
            model(x, x).mean().backward()
            tg.step_optimizers(optimizers, muon, args.grad_clip_norm)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if restore and step == 0:
                states = [opt.state_dict() for opt in optimizers]
                for opt, state in zip(optimizers, states):
                    opt.load_state_dict(state)
        assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in muon.state.values())
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
