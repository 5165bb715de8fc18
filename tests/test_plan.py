"""PLAN: FLOPs against a hand count, memory against a real CPU run, and the problem lines with the exit status."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY_ENV

import plan
import train_gpt as tg

# The starter's block (relu^2, no XSA/bigram/smear extras) at toy size: every matmul is easy to count by hand.
PLAIN = {**TINY_ENV, "BASELINE": "1", "EVAL_STRIDE": "0", "MAX_WALLCLOCK_SECONDS": "600"}


_counts = {}


def count(env, batch, torch_rules):
    """count_train_step, once per configuration: each trace takes seconds on this CPU."""
    key = (tuple(sorted(env.items())), batch, torch_rules)
    if key not in _counts:
        _counts[key] = plan.count_train_step(tg.Hyperparameters(env), batch, torch_rules)
    return _counts[key]


def test_flops_match_a_hand_count():
    args = tg.Hyperparameters(PLAIN)
    T, D, L, V = args.train_seq_len, args.model_dim, args.num_layers, args.vocab_size
    c = count(PLAIN, 2, "2.14")
    kv = args.num_kv_heads * D // args.num_heads
    hidden = args.mlp_mult * D
    per_layer = D * D + 2 * D * kv + D * D + 2 * D * hidden  # c_q, c_k + c_v, proj, fc + mlp proj
    # Forward 2 FLOPs per weight per token, backward twice that; the tied head is a matmul too, the lookup is not.
    assert c["matmul_token"] == 6 * (L * per_layer + V * D)
    # Causal attention: QK^T and PV over the T/2 visible keys on average at 2 FLOPs per MAC; the flash backward
    # recomputes the scores, five such matmuls to the forward's two.
    assert c["attention_token"] == 3.5 * L * 4 * T * D / 2
    assert c["forward_token"] == 2 * (L * per_layer + V * D) + L * 4 * T * D / 2


def real_cpu_layout_step(args):
    """Bytes of weights and optimizer state of a real model in the CUDA dtype layout after one real optimizer step."""
    torch.manual_seed(0)
    model = tg.cuda_layout(tg.MODELS[args.model](args), args)
    optimizers, _ = tg.build_optimizers(args, model)
    x = torch.randint(0, args.vocab_size, (2, args.train_seq_len))
    model(x, x).float().mean().backward()
    for opt in optimizers:
        opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for o in optimizers for s in o.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return weights, state


def eager_saved_bytes(args, batch):
    """Bytes autograd saves for the backward in a real eager fp32 CPU forward (distinct storages)."""
    torch.manual_seed(0)
    model = tg.MODELS[args.model](args)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, args.vocab_size, (batch, args.train_seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x).mean()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("env", [PLAIN, {**TINY_ENV}], ids=["starter", "stack"])
def test_memory_of_a_tiny_model_matches_a_real_cpu_run(env):
    args = tg.Hyperparameters(env)
    c1, c2 = (count(env, b, "2.14") for b in (1, 2))
    weights, state = real_cpu_layout_step(args)
    assert c1["weights"] == c1["grads"] == weights
    assert c1["optimizer"] == state
    # Activations are affine in the batch: the part that does not grow is the bf16 copies of the matmul weights
    # (matrices and the tied head), which the compiled backward keeps; the rest stays under what eager fp32 saves
    # and above the bf16 inputs every block's matmuls must keep (q/k/v/proj/fc/mlp-proj inputs, attention out).
    tokens, D = 2 * args.train_seq_len, args.model_dim
    casts = 2 * (c1["groups"]["matrix"] + args.vocab_size * D)
    assert 2 * c1["activations"] - c2["activations"] == pytest.approx(casts, rel=0.05)
    floor = args.num_layers * tokens * 2 * (4 * D + args.mlp_mult * D)
    assert floor < c2["activations"] < eager_saved_bytes(args, 2)


def test_old_torch_rules_save_less_than_fp32_rmsnorm():
    # torch >= 2.12 runs RMSNorm in fp32 under autocast: the residual stream the backward keeps doubles in size.
    assert count(PLAIN, 2, "2.9")["activations"] < count(PLAIN, 2, "2.14")["activations"]


def test_entropy_bits_count_the_codes():
    # Two equally likely codes: one bit each; one code: none.
    assert plan.entropy_bits(torch.tensor([1, -1] * 8, dtype=torch.int8)) == pytest.approx(1.0)
    assert plan.entropy_bits(torch.zeros(9, dtype=torch.int8)) == 0.0


def plan_problems(env, code_bytes=40_000):
    args = tg.Hyperparameters(env)
    return plan.make_plan(args, args.plan_world_size, args.plan_gpu, code_bytes)["problems"]


def test_a_fitting_tiny_plan_has_no_problem():
    assert plan_problems(PLAIN) == []


@pytest.mark.parametrize("extra, problem", [
    ({"VOCAB_SIZE": "65536", "MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "QUANT_EMBED": "fp16",
      "EXPORT_FORMAT": "pgolf"}, "over_cap"),
    ({"TRAIN_BATCH_TOKENS": str(8 * 2**22), "VOCAB_SIZE": "8192", "TRAIN_SEQ_LEN": "1024"}, "over_memory"),
    ({"TTT_ENABLED": "1", "TTT_EPOCHS": "100000", "TTT_CHUNK_TOKENS": "64"}, "eval_over_time"),
    ({"WARMDOWN_FRAC": "0", "WARMDOWN_ITERS": "1000000"}, "warmdown_too_long"),
])
def test_problem_lines_fire(extra, problem):
    found = plan_problems({**PLAIN, **extra})
    assert len(found) == 1 and found[0].startswith(problem), found


def run_plan(extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE")}
    env.update(PLAIN, PLAN="1", OMP_NUM_THREADS="1", **extra)
    return subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.slow  # a full-shape plan in a subprocess: keeps the README command under 5 minutes
def test_plan_command_exits_zero_and_prints_key_value_lines():
    proc = run_plan({})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for key in ("plan params matrix:", "plan bytes model:", "plan flops per_token:", "plan memory_per_gpu weights:",
                "plan time ms_step:", "plan phase from:0.000", "plan eval roundtrip:", "| peak MiB per GPU |"):
        assert key in out
    assert "plan_done problems:0" in out and "problem:" not in out.replace("problems:", "")


@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_plan_command_exits_nonzero_with_one_line_per_problem():
    proc = run_plan({"TTT_ENABLED": "1", "TTT_EPOCHS": "100000", "TTT_CHUNK_TOKENS": "64", "WARMDOWN_FRAC": "0",
                     "WARMDOWN_ITERS": "1000000"})
    assert proc.returncode == 1
    lines = [l for l in proc.stdout.splitlines() if l.startswith("problem:")]
    assert [l.split()[0] for l in lines] == ["problem:eval_over_time", "problem:warmdown_too_long"]


def test_a_cuda_run_logs_its_plan_for_its_own_world_size_and_gpu():
    # main() calls this on CUDA only (a CPU run's plan would be of a GPU it does not have); here on a CPU stand-in.
    lines = []
    run = SimpleNamespace(master=True, args=tg.Hyperparameters(PLAIN), world_size=2, device=torch.device("cpu"),
                          counted_code=b"x" * 50_000, log=lines.append)
    p = tg.log_run_plan(run, val_tokens=20_000)
    assert p["world_size"] == 2 and lines[-1] == "plan_done problems:0"
    assert any(re.match(r"plan\S* .*ms_step", l) for l in lines), lines


def test_throughput_is_tokens_per_second_and_mfu_from_the_plans_counted_flops():
    clock = SimpleNamespace(step=10, ms=2000.0)
    run = SimpleNamespace(args=SimpleNamespace(train_batch_tokens=1000), plan=None, world_size=8)
    assert tg.throughput(run, clock) == "tokens_per_s:5000"  # no plan (a CPU run): no MFU
    run.plan = {"peak_flops": 989e12, "flops_token": 0.25 * 8 * 989e12 / 5000}  # a quarter of 8 H100s' bf16 peak
    assert tg.throughput(run, clock) == "tokens_per_s:5000 mfu:25.0%"


def cpu_run(lines):
    return SimpleNamespace(master=True, args=tg.Hyperparameters(PLAIN), world_size=2, device=torch.device("cpu"),
                           counted_code=b"x" * 50_000, log=lines.append)


def test_a_failing_planner_is_a_logged_warning_not_the_end_of_a_run(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(plan, "make_plan", broken)
    lines = []
    assert tg.log_run_plan(cpu_run(lines), val_tokens=20_000) is None
    assert lines == ["WARNING: plan: failed, training goes on without it: RuntimeError: boom"]


def test_without_records_plan_py_a_run_says_so_and_plan_1_refuses_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tg, "SCRIPT_DIR", tmp_path)  # a frozen record folder: train_gpt.py alone
    lines = []
    assert tg.log_run_plan(cpu_run(lines), val_tokens=20_000) is None
    assert lines == ["plan: skipped, no records/plan.py beside train_gpt.py"]
    with pytest.raises(tg.ConfigError, match="PLAN=1 needs records/plan.py"):
        tg.print_plan(tg.Hyperparameters(PLAIN))


def test_every_evaluation_path_is_priced_by_the_planner():
    # A path added to train_gpt.EVAL_PATHS without a cost model in records/plan.py EVAL_COSTS fails here (and the
    # plan of a run that takes it refuses instead of pricing it at 0 s).
    assert set(tg.EVAL_PATHS) == set(plan.EVAL_COSTS)


def test_an_unpriced_path_is_refused(monkeypatch):
    monkeypatch.setitem(tg.EVAL_PATHS, "new_path", tg.EvalPath(lambda args: True, None))
    with pytest.raises(tg.ConfigError, match="'new_path' has no cost model"):
        plan.project_eval_seconds(tg.Hyperparameters(PLAIN), {})


def test_phases_follow_the_loop_switch_and_the_sequence_schedule():
    args = tg.Hyperparameters({"PLAN_TORCH": "2.9", "STACK": "1855"})  # loops on from 35% of training, one length
    assert plan.train_phases(args) == [(0.0, 0.35, 2048, False), (0.35, 1.0, 2048, True)]
    assert plan.train_phases(tg.Hyperparameters({"PLAN_TORCH": "2.9"})) == [  # the default: #2014's schedule
        (0.0, 0.1, 1024, False), (0.1, 0.35, 2048, False), (0.35, 0.7, 2048, True), (0.7, 1.0, 3072, True)]
    assert plan.train_phases(tg.Hyperparameters(PLAIN)) == [(0.0, 1.0, tg.Hyperparameters(PLAIN).train_seq_len, False)]



def test_lora_work_counts_the_windows_of_each_round():
    # One document of 5 chunks of 2, windows of at most 6: rounds of width 2, 4, 6, 6, 6.
    assert plan.lora_work([10.0], slots=1, seq=6, chunk=2, world_size=1, batched=True) == (24, 5)
    # Batched: two rows padded to the longer document (3 rounds: 2, 4, 6), on 2 GPUs.
    assert plan.lora_work([2.0, 6.0], slots=2, seq=6, chunk=2, world_size=2, batched=True) == (12, 1.5)


def test_doc_lengths_sum_to_the_split_and_ascend():
    lengths = plan.doc_lengths(1000, 1_000_000)
    assert sum(lengths) == pytest.approx(1_000_000) and lengths == sorted(lengths)


@pytest.mark.slow  # a plan of each record's settings (nine traced steps and the quantizer at full size): minutes
def test_the_plan_is_within_15_percent_of_each_records_log():
    # docs/plan.md's table. ms/step on every log (#2014's is held out of the time model's fit), evaluation time
    # where the plan prices the log's paths, bytes where the log's export is ours (#1855's recipe).
    for row in plan.calibration_rows():
        for what in ("ms_step", "steps", "eval_s", "model_bytes"):
            predicted, logged = row[what]
            if logged is not None:
                assert abs(predicted / logged - 1) < 0.15, (row["name"], what, predicted, logged)
