"""Estimate a configuration's artifact size on a CPU, before spending GPU time on it.

    NUM_LAYERS=12 MLP_MULT=3 python3 records/estimate_size.py [--steps 3] [--tokens 4096]

Builds the model the env vars describe (train_gpt.py's settings), takes a few optimizer steps on random tokens
(so zero-initialized projections are no longer zero; the EMA applied as a run applies it), calibrates GPTQ on
random tokens, then calls the run's own export phase (train_gpt.export_artifact: quantize, compress, prune to fit
under the cap less the counted code). Prints the model bytes, the counted code bytes, their total against the cap
and how many weights the export had to zero to fit (pruned_to_fit > 0 counts as over the cap). Weights this close to their init give an estimate, not the trained size: SDClip ties each row's grid
step to its spread, so trained rows should cost about as many bits per weight. Exit codes: 0 fits, 1 over the cap.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def estimate(args: tg.Hyperparameters, steps: int, tokens: int, seq_len: int = 256) -> tuple[tg.Export, int, float]:
    """(the export, counted code bytes, parameters in millions) of the configuration `args`."""
    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    model = tg.build_model(args, cpu)
    optimizers, _ = tg.build_optimizers(args, model)
    ema = tg.WeightEMA(model, args.ema_decay) if args.ema_decay > 0 else None

    def batch():
        x = torch.randint(0, args.vocab_size, (max(1, tokens // seq_len), seq_len + 1))
        return x[:, :-1], x[:, 1:]

    for _ in range(steps):
        model(*batch()).mean().backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        if ema is not None:
            ema.update()
    if ema is not None:
        ema.apply()
        model.after_load()
    hessians = tg.collect_hessians(model, [batch()]) if args.gptq else None
    code = tg.counted_code((tg.SCRIPT_DIR / "train_gpt.py").read_bytes(), args)
    export = tg.export_artifact(args, model.state_dict(), hessians, len(code), log=lambda msg: None)
    return export, len(code), sum(p.numel() for p in model.parameters()) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps on random tokens before the export")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (sequences of 256)")
    opts = ap.parse_args()
    try:
        args = tg.Hyperparameters()
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    export, code_bytes, params = estimate(args, opts.steps, opts.tokens)
    total = len(export.blob) + code_bytes
    print(f"params:{params:.3f}M quant:{args.quant_attn}/{args.quant_mlp}/{args.quant_embed} gptq:{int(args.gptq)} "
          f"compressor:{args.compressor} steps:{opts.steps} time:{time.perf_counter() - t0:.0f}s")
    print(f"model_bytes:{len(export.blob)} code_bytes:{code_bytes} total_bytes:{total} cap:{tg.SIZE_CAP_BYTES} "
          f"pruned_to_fit:{export.pruned} margin:{tg.SIZE_CAP_BYTES - total}")
    # The run would prune to fit; an estimate that needs pruning is over the cap.
    return 0 if export.pruned == 0 and total <= tg.SIZE_CAP_BYTES else 1

if __name__ == "__main__":
    sys.exit(main())
