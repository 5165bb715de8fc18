"""Compare the artifact compressors on the full-size stand-in of docs/export.md "Against the 1.0611 record".

    OMP_NUM_THREADS=1 python3 records/compress_bench.py [--cache /tmp/standin_qsd.pt] [NAME ...]

The stand-in (NOT trained weights): our GPT with the 1.0611 record's model settings (RECIPE of
tests/test_recipe_model.py, its 35,945,671 parameters), every matrix replaced by Gaussian rows of std 0.5-1.5 /
sqrt(fan-in), GPTQ on random SPD Hessians (tests/test_recipe_quant.py's spd, one per input) with the record's
quantization (RECIPE_QUANT). Quantized once and cached. For each compressor (default: every available one) prints
the artifact's bytes and the CPU seconds (user + system, all threads and child processes) to pack and to unpack,
and checks the round trip.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import train_gpt as tg  # noqa: E402


def standin_qsd(seed: int = 0) -> dict[str, dict]:
    from test_recipe_model import RECIPE
    from test_recipe_quant import RECIPE_QUANT, spd

    args = tg.Hyperparameters({**RECIPE, **RECIPE_QUANT})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sd = tg.build_model(args, torch.device("cpu")).state_dict()
    hessians, by_fan_in = {}, {}
    for name, t in sd.items():
        if t.ndim == 2 and t.numel() > tg.KEEP_FLOAT_MAX_NUMEL:
            rows, cols = t.shape
            sd[name] = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen).add(0.5) / cols ** 0.5
            hessians[name] = by_fan_in[cols] if cols in by_fan_in else by_fan_in.setdefault(cols, spd(cols, gen))
    return tg.quantize_state_dict(sd, args, hessians)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/standin_qsd.pt", help="the quantized stand-in, made once")
    ap.add_argument("names", nargs="*", help="compressors (default: every available one)")
    opts = ap.parse_args()
    if os.path.exists(opts.cache):
        qsd = torch.load(opts.cache, weights_only=True)
    else:
        qsd = standin_qsd()
        torch.save(qsd, opts.cache)
    raw = sum(t.numel() * t.element_size() for e in qsd.values() for p, t in e.items() if p != "dtype")
    print(f"standin params:{sum(t.numel() for e in qsd.values() for p, t in e.items() if p in ('q', 'w'))} "
          f"raw_bytes:{raw}", flush=True)
    for name in opts.names or tg.available_compressors():
        c0 = cpu_seconds()
        blob = tg.pack_artifact(qsd, {}, name)
        c1 = cpu_seconds()
        back, _ = tg.unpack_artifact(blob)
        c2 = cpu_seconds()
        same = all(torch.equal(back[n][p], e[p]) for n, e in qsd.items() for p in e if p != "dtype")
        print(f"compressor:{name} bytes:{len(blob)} pack_cpu_s:{c1 - c0:.1f} unpack_cpu_s:{c2 - c1:.1f} "
              f"round_trip:{'exact' if same else 'DIFFERS'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
