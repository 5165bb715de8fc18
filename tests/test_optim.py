"""Optimizer, schedule and data-order options: each is off by default, switches on, changes what it should, stays
finite; batched Newton-Schulz gives the per-matrix result; the shuffled loader and the EMA do what they say."""

import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from build_shards import write_shard
from conftest import data_env, run_train

TINY = {"BASELINE": "1", "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "ITERATIONS": "6", "WARMDOWN_ITERS": "3", "MAX_WALLCLOCK_SECONDS": "0", "MUON_MOMENTUM_WARMUP_STEPS": "3"}


def train_in_process(steps=6, **env):
    """A few optimizer steps of a tiny model memorizing one random batch: (losses, final parameters)."""
    args = tg.Hyperparameters({**TINY, **env})
    torch.manual_seed(0)
    model = tg.build_model(args, torch.device("cpu"))
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


def train_losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]


# -----------------------------
# Newton-Schulz
# -----------------------------

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


# -----------------------------
# Muon options
# -----------------------------

def muon_direction(o, steps=1, **options):
    p = torch.nn.Parameter(torch.zeros_like(o))
    muon = tg.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, **options)
    for _ in range(steps):
        d = muon._direction(p, o, muon.param_groups[0])
    return d / max(1, o.size(0) / o.size(1)) ** 0.5  # without the shape scale


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_normuon_and_post_ns_row_norm_preserve_the_update_norm(shape):
    torch.manual_seed(0)
    o = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of very different size
    for options in [dict(normuon_beta2=0.9), dict(post_ns_row_norm=True), dict(normuon_beta2=0.9, post_ns_row_norm=True)]:
        d = muon_direction(o, steps=3, **options)
        assert d.norm().item() == pytest.approx(o.norm().item(), rel=1e-5), options
        assert not torch.allclose(d, o), options
    rows = muon_direction(o, post_ns_row_norm=True).norm(dim=1)
    assert torch.allclose(rows, rows.mean().expand_as(rows), rtol=1e-5)  # every row the same norm


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


def test_bad_option_values_raise_config_errors():
    for env, needle in [({"MUON_NS_COEFFS": "cubic"}, "MUON_NS_COEFFS"), ({"TRAIN_LOADER": "random"}, "TRAIN_LOADER"),
                        ({"EMA_DECAY": "1.0"}, "EMA_DECAY"), ({"WARMDOWN_FRAC": "2"}, "WARMDOWN_FRAC")]:
        with pytest.raises(tg.ConfigError, match=needle):
            tg.Hyperparameters(env)


# -----------------------------
# Schedule and EMA
# -----------------------------

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
    model = tg.build_model(tg.Hyperparameters(TINY), torch.device("cpu"))
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


# -----------------------------
# Shuffled loader
# -----------------------------

def test_shuffled_loader_deals_disjoint_sequences_covering_each_shard(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 103))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(1000, 1090))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    L, world, per_call = 4, 2, 3  # 3 sequences per rank per call

    def starts(seed, calls):
        loaders = [tg.ShuffledTokenLoader(pattern, 1100, r, world, torch.device("cpu"), seed) for r in range(world)]
        out = []
        for _ in range(calls):
            per_rank = []
            for loader in loaders:
                x, y = loader.next_batch(world * per_call * L, L, 1)
                assert x.shape == (per_call, L) and torch.equal(y[:, :-1], x[:, 1:])
                assert (x[:, 1:] - x[:, :-1] == 1).all() and (y[:, -1] - x[:, -1] == 1).all()  # contiguous spans
                per_rank.append(x[:, 0].tolist())
            assert not set(per_rank[0]) & set(per_rank[1])  # disjoint across ranks
            out += per_rank[0] + per_rank[1]
        return out

    # The first pass deals shard 0 whole, then shard 1 whole: every sequence at the shard's phase, each once.
    dealt = starts(seed=7, calls=10)
    split = next(i for i, s in enumerate(dealt) if s >= 1000)
    end = next(i for i in range(split, len(dealt)) if dealt[i] < 1000)
    for block, base, size in [(dealt[:split], 0, 103), (dealt[split:end], 1000, 90)]:
        phase = (min(block) - base) % L
        assert sorted(block) == [base + phase + L * j for j in range((size - phase - 1) // L)]
        assert block != sorted(block)  # shuffled
    assert starts(seed=7, calls=10) == dealt and starts(seed=8, calls=10) != dealt  # deterministic from SEED


# -----------------------------
# End to end
# -----------------------------

STACK = {"MUON_NS_COEFFS": "polar_express", "MUON_ROW_NORM": "1", "NORMUON_BETA2": "0.9", "MUON_WD": "0.04",
         "ADAM_WD": "0.01", "CAUTIOUS_WD": "1", "TRAIN_LOADER": "shuffled", "GRAD_CLIP_NORM": "0.3"}


def test_torchrun_two_processes_with_the_option_stack_match_one(tiny_data, tmp_path):
    env = data_env(tiny_data, SEED="1", ITERATIONS="8", **STACK)
    run_train(tmp_path, {**env, "RUN_ID": "one"})
    run_train(tmp_path, {**env, "RUN_ID": "two"}, nproc=2)
    one, two = ((tmp_path / "logs" / f"{r}.txt").read_text() for r in ("one", "two"))
    assert "world_size:2 grad_accum_steps:4" in two and re.search(r"^muon:reduce_scatter matrices:\d+", two, re.M)
    assert len(train_losses(one)) == 8 and np.allclose(train_losses(one), train_losses(two), atol=2e-4)
    bpb = [float(re.search(r"^submission score:\S+ val_loss:\S+ val_bpb:(\S+)", t, re.M).group(1)) for t in (one, two)]
    assert bpb[0] == pytest.approx(bpb[1], abs=1e-3)


def test_ema_run_scores_and_exports_the_averaged_weights(tiny_run, tiny_data, tmp_path):
    _, log, _ = tiny_run  # the default EMA
    run_train(tmp_path, data_env(tiny_data, RUN_ID="plain", SEED="1", EMA_DECAY="0"))
    plain = (tmp_path / "logs" / "plain.txt").read_text()
    assert re.search(r"^ema:applied decay:0.997 steps:30$", log, re.M) and not re.search(r"^ema:applied", plain, re.M)
    assert train_losses(log) == train_losses(plain)  # the average never feeds back into training

    def bpb(text, what):
        return float(re.search(rf"^final_{what}_exact val_loss:\S+ val_bpb:(\S+)", text, re.M).group(1))

    # The scored weights changed, and the exported artifact holds those same (averaged) weights.
    assert bpb(log, "prequant") != bpb(plain, "prequant")
    assert abs(bpb(log, r"\w+_roundtrip") - bpb(log, "prequant")) < 0.02
