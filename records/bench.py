"""One prepared GPU check: the default and BASELINE=1 side by side, a fixed number of compiled, warmed steps each.

    python3 records/bench.py [--steps 20] [--warmup 3] [--configs default,baseline] [--val-tokens 1048576]

For each configuration (the env vars in force, plus BASELINE=1 for `baseline`) it builds the model, the optimizers
and the attention kernel exactly as a run does (train_gpt.build_model, build_optimizers, activate_attention,
train_step) and times training steps of ONE GPU's share of an 8-GPU step (TRAIN_BATCH_TOKENS / 8 tokens, one
micro-batch, no gradient communication) on random tokens with a BOS every 64-1,024 tokens, so document-packed
attention sees documents. Then it times every evaluation path the configuration enables (EVAL_PATHS, rank 0 of 8)
on a random val stream of --val-tokens tokens, after one untimed pass that compiles, and projects it to the full
val split on 8 GPUs. It prints one table: ms/step, tokens/s and MFU projected to 8 GPUs (no communication, so an
upper bound), peak memory, compile time (the first step), attention kernel, and each evaluation path's seconds.
FLOPs per token are counted as PLAN=1 counts them (train_gpt.count_train_step). On a machine without CUDA it runs
on the CPU (a test runs it at a tiny shape), where the figures mean nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402
import plan  # noqa: E402  (records/plan.py, beside this file)

CONFIGS = {"default": {}, "baseline": {"BASELINE": "1"}}
WORLD = 8  # the challenge's GPUs: each step is one GPU's share of theirs


def random_documents(n: int, vocab_size: int, generator: torch.Generator, lengths: tuple[int, int] = (64, 1025)):
    """n random tokens (never BOS), a BOS starting a document every lengths[0] to lengths[1] - 1 tokens."""
    tokens = torch.randint(2, vocab_size, (n,), generator=generator)
    at = 0
    while at < n:
        tokens[at] = tg.BOS_ID
        at += int(torch.randint(*lengths, (1,), generator=generator))
    return tokens


class RandomLoader:
    """Train batches of random documents, made on the host as a train loader's are (BatchPrefetcher moves them)."""

    files = ()

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int):
        local = random_documents(global_tokens // (WORLD * grad_accum_steps) + 1, self.vocab_size, self.generator)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def bench(name: str, env: dict, steps: int, warmup: int, val_tokens: int, device: torch.device) -> dict:
    args = tg.Hyperparameters(env)
    code = Path(tg.__file__).read_bytes()
    run = tg.Run(args, 0, WORLD, False, device, code, tg.counted_code(code, args), io.StringIO())
    tg.prepare_device(args, device)
    tg.activate_attention(run)
    torch.manual_seed(args.seed)
    base = tg.build_model(args, device)
    optimizers, muon = tg.build_optimizers(args, base)
    loader = tg.BatchPrefetcher(RandomLoader(args.vocab_size, args.seed), device, args.prefetch_batches)
    # At TRAIN_SEQ_LEN: the last (longest) stage of a progressive schedule.
    t = tg.Training(base, tg.compiled(base, args), optimizers, muon, loader, None, seq_len=args.train_seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def steps_seconds(n: int) -> float:
        tg.sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            tg.train_step(run, t, 1.0, tg.muon_momentum(args, 0))
        tg.sync(device)
        return time.perf_counter() - t0

    compile_s = steps_seconds(1)  # the first step compiles
    steps_seconds(warmup)
    ms_step = 1000.0 * steps_seconds(steps) / steps
    loader.close()
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    micro = args.train_batch_tokens // (WORLD * run.grad_accum_steps * args.train_seq_len)
    flops_token = plan.count_train_step(args, micro, args.plan_torch)["flops_token"]
    tokens_s = args.train_batch_tokens / (ms_step / 1000.0)
    gpu = plan.gpu_kind(torch.cuda.get_device_name(device) if device.type == "cuda" else "", args.plan_gpu)
    mfu = flops_token * tokens_s / (WORLD * plan.GPU_SPECS[gpu][1] * 1e12)
    return {"config": name, "ms_step": ms_step, "tokens_s": tokens_s, "mfu": mfu, "peak_mib": peak_mib,
            "compile_s": compile_s, "kernel": base.attention_kernel,
            "evals": eval_seconds(args, base, val_tokens, device)}


def eval_seconds(args: tg.Hyperparameters, model: torch.nn.Module, val_tokens: int, device: torch.device) -> dict:
    """Each enabled evaluation path timed on rank 0's share of a random val stream (a first pass compiles), then
    projected to the full val split (plan.val_tokens_of) over 8 GPUs."""
    tokens = random_documents(val_tokens, args.vocab_size, torch.Generator().manual_seed(args.seed)).to(device)
    byte_counts = torch.full((val_tokens,), 4, dtype=torch.int32, device=device)  # any counts time the same
    out = {}
    for name, path in tg.EVAL_PATHS.items():
        if not path.enabled(args):
            continue
        for _ in range(2):  # the first pass compiles
            tg.sync(device)
            t0 = time.perf_counter()
            path.run(args, model, tokens, byte_counts, 0, WORLD, device)
            tg.sync(device)
        out[name] = (time.perf_counter() - t0) * plan.val_tokens_of(args) / val_tokens
    return out


def table(rows: list[dict], device_name: str) -> str:
    names = sorted({k for r in rows for k in r["evals"]}, key=list(tg.EVAL_PATHS).index)
    lines = [f"bench on 1x{device_name}, projected to {WORLD} GPUs (one GPU's share of each step, no communication)",
             "| config | ms/step | tokens/s | MFU | peak MiB | compile s | attention | "
             + " | ".join(f"{n} s (8 GPUs)" for n in names) + " |",
             "|" + "---|" * (7 + len(names))]
    for r in rows:
        evals = " | ".join(f"{r['evals'][n]:.0f}" if n in r["evals"] else "-" for n in names)
        lines.append(f"| {r['config']} | {r['ms_step']:.2f} | {r['tokens_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mib']:,.0f} | {r['compile_s']:.1f} | {r['kernel']} | {evals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (which compiles)")
    ap.add_argument("--configs", default="default,baseline", help=f"comma-separated, of {sorted(CONFIGS)}")
    ap.add_argument("--val-tokens", type=int, default=1 << 20, help="random val stream each evaluation path scores")
    a = ap.parse_args(argv)
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for name in a.configs.split(","):
        env = {**{k: v for k, v in os.environ.items() if k.isupper()}, **CONFIGS[name]}
        rows.append(bench(name, env, a.steps, a.warmup, a.val_tokens, device))
    print(table(rows, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
