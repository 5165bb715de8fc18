"""Muon: the batched optimizer equals a per-matrix reference; compiled Newton-Schulz builds one graph per shape and
gives the eager result; on 2 gloo processes (matrix gradients reduce-scattered by Muon, not DDP; updates
all-gathered; global-norm clipping, or each rank clipping its own gradients) training equals one process on the same
global batch."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg

# The default stack at toy size: 3 layers give shape groups of 6, 3 and 1 matrices (odd counts leave a padded chunk
# on 2 ranks); NorMuon adds optimizer state; GRAD_CLIP_NORM keeps its default 0.3, which the first steps exceed.
TOY = {"VOCAB_SIZE": "64", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
       "ROPE_DIMS": "4", "BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "16", "ITERATIONS": "6", "MAX_WALLCLOCK_SECONDS": "0",
       "MUON_MOMENTUM_WARMUP_STEPS": "3", "NORMUON_BETA2": "0.9", "MUON_BF16": "0"}  # fp32: the tolerance is fp32's
STEPS, BATCH, SEQ = 6, 8, 16


def train(rank=0, world_size=1, halves=False, **env):
    """STEPS steps on one fixed global batch, this rank's share of it: (global losses, grad norms, params, grad probe).
    halves (one process): the gradient is the mean of each half's, clipped by its own norm (GRAD_CLIP_SCOPE=rank's
    rule on 2 ranks, written plainly)."""
    args = tg.Hyperparameters({**TOY, **env})
    per_rank = args.grad_clip_scope == "rank"
    torch.manual_seed(0)
    base_model = tg.build_model(args, torch.device("cpu"))
    model = tg.ddp_without_matrices(base_model, base_model, torch.device("cpu")) if world_size > 1 else base_model
    if world_size > 1:
        model.require_backward_grad_sync = not per_rank
    optimizers, muon = tg.build_optimizers(args, base_model)
    x = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    matrices = {id(p) for p in base_model.param_groups()["matrix"]}
    losses, norms, probe = [], [], None
    for step in range(STEPS):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if halves:
            loss, norm = clipped_halves(base_model, x, args.grad_clip_norm)
        else:
            loss = model(x[rows], torch.roll(x, -1, 1)[rows]).mean()
            loss.backward()
        if probe is None:  # this rank's gradient sums: matrices (left to Muon), the rest (DDP's means)
            probe = torch.stack([sum(p.grad.sum() for p in base_model.parameters()
                                     if p.grad is not None and (id(p) in matrices) == m)
                                 for m in (True, False)])
        for g in muon.param_groups:
            g["momentum"] = 0.9
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * tg.lr_multiplier(args, step, 0.0)
        if halves:
            tg.step_optimizers(optimizers, muon, 0.0)
        else:
            norm = tg.step_optimizers(optimizers, muon, args.grad_clip_norm, per_rank=per_rank)
        norms.append(None if norm is None else norm.item())
        base_model.after_optimizer_step()
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world_size)
    return losses, norms, [p.detach().clone() for p in base_model.parameters()], probe


def clipped_halves(model, x, max_norm):
    """The mean of the two halves' gradients, each clipped by its own norm; (mean loss, the first half's norm)."""
    grads, losses, norms = [], [], []
    for half in (x[: BATCH // 2], x[BATCH // 2:]):
        model.zero_grad(set_to_none=True)
        loss = model(half, torch.roll(half, -1, 1)).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        losses.append(loss.detach())
    for p, a, b in zip([p for p in model.parameters() if p.grad is not None], *grads):
        p.grad = (a + b) / 2
    return (losses[0] + losses[1]) / 2, norms[0]


def _two_rank_worker(rank, init_file, out, envs):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = []
    for env in envs:
        losses, norms, params, probe = train(rank, 2, **env)
        probes = [torch.zeros(2), torch.zeros(2)]
        dist.all_gather(probes, probe)
        results.append((losses, norms, params, probes))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("env", [{"XSA_LAST_N": "1"}, pytest.param({"MODEL": "ngpt"}, marks=pytest.mark.slow)],
                         ids=["gpt", "ngpt"])  # nGPT's two processes: slow (the README command under 5 minutes)
def test_two_gloo_processes_equal_one_with_global_and_per_rank_clipping(env, tmp_path):
    envs = [{**env, "GRAD_CLIP_SCOPE": "global"}, {**env, "GRAD_CLIP_SCOPE": "rank"}]
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt"), envs), nprocs=2,
                       start_method="spawn")
    (losses2, norms2, params2, probes), (losses_r, norms_r, params_r, probes_r) = torch.load(tmp_path / "out.pt")
    losses1, norms1, params1, _ = train(**envs[0])
    assert probes[0][0] != probes[1][0] and torch.equal(probes[0][1], probes[1][1])  # DDP skipped the matrices
    assert max(norms1) > float(tg.Hyperparameters(TOY).grad_clip_norm)  # the clip acted
    assert norms2 == pytest.approx(norms1, rel=1e-5)
    assert losses2 == pytest.approx(losses1, abs=2e-5) and losses1[-1] < losses1[0]
    # Rounding differs (sums over ranks), and Adam magnifies it where a gradient is near zero.
    assert max((a - b).abs().max().item() for a, b in zip(params1, params2)) < 1e-4
    # Per rank: each rank's own gradients (no DDP sum: they differ on every parameter) clipped by their own norm, then
    # averaged: the plain rule on one process. Its steps differ from the global clip's.
    assert (probes_r[0] != probes_r[1]).all()
    halves = train(halves=True, **envs[1])
    assert norms_r == pytest.approx(halves[1], rel=1e-5) and losses_r == pytest.approx(halves[0], abs=2e-5)
    assert max((a - b).abs().max().item() for a, b in zip(params_r, halves[2])) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(params_r, params2)) > 1e-3


def reference_muon(params, grads, lr, momentum, steps, beta2):
    """Muon written per matrix and plainly: Nesterov momentum, MuonEq-R, Newton-Schulz, NorMuon, shape scale."""
    params, bufs, v = [p.clone() for p in params], [torch.zeros_like(p) for p in params], [0.0] * len(params)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            bufs[i] = momentum * bufs[i] + g
            G = g + momentum * bufs[i]
            G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-7)
            O = tg.zeropower_via_newtonschulz5(G, steps)
            rows, cols = O.shape
            v[i] = beta2 * v[i] + (1 - beta2) * O.square().mean(1 if rows >= cols else 0, keepdim=True)
            H = O / v[i].clamp_min(1e-10).sqrt()
            params[i] -= lr * H * (O.norm() / H.norm()) * max(1, rows / cols) ** 0.5
    return params


def test_batched_muon_equals_the_per_matrix_reference():
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 16), (24, 8), (8, 16), (8, 16), (12, 12)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    muon = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, row_norm=True, normuon_beta2=0.9)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        muon.step()
    for got, want in zip(params, reference_muon(start, grads, 0.05, 0.9, 5, 0.9)):
        assert torch.allclose(got.detach(), want, atol=1e-5)


def test_compiled_newton_schulz_builds_one_graph_per_shape_and_matches_eager(monkeypatch):
    # Dynamo's graphs and guards are what this checks; the eager backend skips inductor's C++ build (over 2 minutes
    # on 2 busy cores; inductor gives the same result to 1e-5, checked by hand).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 16), (24, 8), (8, 16), (8, 16)]  # two shape groups, one tall (transposed inside)
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for compile in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        muon = tg.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, coeffs="polar_express", compile=compile)
        for i, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            muon.param_groups[0]["lr"] = 0.05 / (i + 1)  # schedules change group values, never the graphs
            muon.step()
        results.append(params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, atol=1e-5)


def test_global_clip_scales_every_gradient_by_the_norm_of_all_of_them():
    grads, shards = [torch.full((3,), 2.0)], [torch.full((2, 2), 1.0), torch.zeros(4)]  # norm sqrt(12 + 4) = 4
    norm = tg.clip_grad_norm_global(grads, shards, 1.0)
    assert norm.item() == pytest.approx(4.0)
    assert torch.allclose(grads[0], torch.full((3,), 0.5), rtol=1e-5)
    assert torch.allclose(shards[0], torch.full((2, 2), 0.25), rtol=1e-5)
    before = [torch.ones(2)]
    tg.clip_grad_norm_global(before, [], 10.0)  # under the limit: untouched
    assert torch.equal(before[0], torch.ones(2))
