"""Parameter Golf trainer: train, quantize, export and score a small LM under the 16 MB / 10 min rules.

Record run:  torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU smoke:   SMOKE=1 python3 train_gpt.py   (builds an embedded dataset if missing; no GPU, no network)
Every knob is an env var, declared in SETTING_SECTIONS (docs/settings.md lists them); importing this file runs nothing.
"""

from __future__ import annotations

import base64
import copy
import difflib
import fnmatch
import glob
import hashlib
import importlib.util
import io
import json
import lzma
import math
import os
import pickle
import platform
import queue
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.varlen import varlen_attn
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------
# HYPERPARAMETERS
# -----------------------------

SIZE_CAP_BYTES = 16_000_000
MAX_PARAMS = 2**30
SCRIPT_DIR = Path(__file__).resolve().parent
# [presets]
# SMOKE=1 defaults: a tiny model on the embedded corpus (README: the smoke's time and scores). Env vars set explicitly
# still win over these.
SMOKE_PRESET = {
    "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "VAL_BATCH_SIZE": "65536",
    "ITERATIONS": "80", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "25", "MUON_MOMENTUM_WARMUP_STEPS": "50",
    "EVAL_STRIDE": "128", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "4096", "TTT_EPOCHS": "1", "TTT_LR": "0.05",
    "WARMDOWN_FRAC": "0.3", "VOCAB_SIZE": "1024", "MUON_BF16": "0", "EMA_WARMUP": "1",
}
SMOKE_CACHE = SCRIPT_DIR / "data"  # the only place SMOKE=1's auto-build writes


def smoke_cache(vocab_size: str) -> dict[str, str]:
    """SMOKE=1's own dataset and tokenizer, named by the vocabulary size, so one size's cache never serves another."""
    return {"DATA_PATH": str(SMOKE_CACHE / f"datasets/smoke_sp{vocab_size}"),
            "TOKENIZER_PATH": str(SMOKE_CACHE / f"tokenizers/smoke_{vocab_size}_bpe.model")}


# SMOKE=1 on the recipe (not STACK=1.1194, not BASELINE=1): its layer-indexed parts fitted to the smoke's 4 layers.
# Its evaluation is the recipe's phased TTT instead of full TTT, at a CPU's scale: prefix half the smoke's 80 val
# documents, rank-8 adapters, 256-token chunks (the recipe's 48-token chunks and rank 80 take ~20 min here).
SMOKE_RECIPE_PRESET = {"RECUR_LAYERS": "1-2", "PARALLEL_LANES_FROM": "3", "TTT_ENABLED": "0", "PHASED_TTT_PREFIX_DOCS": "40",
                       "LORA_RANK": "8", "LORA_CHUNK_TOKENS": "256",
                       "LORA_SHORT_CHUNKS": "128:64"}
# SMOKE=1 on the #2014 recipe, the default, in about a minute on 2 cores (README): its progressive context at the
# smoke's 256 tokens (two length changes), the re-warm-up at that scale (#2014's 32 of ~4,900 steps: 2 still exercises
# it), 40 steps of 4,096 tokens, matrices over 4,096 values quantized (at the records' 65,536 none of this model is),
# and its evaluation (the artifact's roundtrip and phased TTT, no sliding windows) on the val split's first 4 documents.
SMOKE_2014_PRESET = {"TRAIN_SEQ_SCHEDULE": "64@0.100,128@0.700,256@1.000", "SEQ_CHANGE_WARMUP_STEPS": "2",
                     "ITERATIONS": "40", "TRAIN_BATCH_TOKENS": "4096", "MUON_MOMENTUM_WARMUP_STEPS": "20",
                     "QUANT_FLOAT_MAX": "4096", "EVAL_STRIDE": "0", "VAL_DOCS": "4", "PHASED_TTT_PREFIX_DOCS": "2"}
# STACK=1855: the #1855 recipe (1.0611), our default before #2014's: every default #2014 changed, back.
STACK_1855_PRESET = {
    "QK_GAIN_INIT": "5.0", "TRAIN_SEQ_LEN": "2048", "GPTQ_RESERVE_SECONDS": "0.5", "SOFTCAP_ASYM": "0",
    "LORA_TARGETS": "*.c_q,*.c_k,*.c_v,*.attn,*.mlp,tied_head,lm_head", "LORA_LR": "0.0001",
    "LORA_SLOTS": "64", "LORA_SHORT_CHUNKS": "", "PHASED_TTT_NUM_PHASES": "3", "AWQ_GROUPS": "0",
}
# STACK=1.1194: our default before the 1.0611 recipe (the 1.1194-era stack, docs/frontier.md): every default
# the recipe changed, back, on top of STACK=1855's. BASELINE=1 starts from it.
STACK_1194_PRESET = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model",
    "VOCAB_SIZE": "1024", "MLP_MULT": "3", "XSA_LAST_N": "4", "ATTN_GATE_DIMS": "0", "ATTN_GATE_MAX": "2.0",
    "ATTN_GATE_SCALE": "1.0", "SMEAR_GATE_DIMS": "0", "PARALLEL_RESID_FROM": "7", "PARALLEL_LANES_FROM": "-1",
    "RECUR_LAYERS": "", "ORTHO_INIT": "0", "BIGRAM_BUCKETS": "2048", "MATRIX_LR": "0.04", "TIED_EMBED_LR": "0.05",
    "SCALAR_LR": "0.04", "MUON_MOMENTUM": "0.95", "MUON_MOMENTUM_WARMUP_START": "0.85",
    "MUON_MOMENTUM_WARMUP_STEPS": "500", "MUON_NS_COEFFS": "quintic", "MUON_BF16": "0", "BETA2": "0.95",
    "MUON_WD": "0.04", "ADAM_WD": "0.0", "EMBED_WD": "0.0", "WARMDOWN_FRAC": "0.72", "MIN_LR": "0.0",
    "EMA_DECAY": "0.997", "EMA_WARMUP": "1", "COMPRESSOR": "best", "GPTQ_RESERVE_SECONDS": "5.0",
    "QUANT_EMBED": "int8", "SDCLIP_K_ATTN": "12.85", "SDCLIP_K_MLP": "12.85", "SDCLIP_K_EMBED": "10.0",
    "QUANT_GATE": "float", "QUANT_CONTROL": "fp32", "QUANT_FLOAT_MAX": "4096", "GPTQ_CALIB_BATCHES": "1",
    "GPTQ_FP64": "1", "LOWRANK_RANK": "0", "GRAD_CLIP_SCOPE": "global",
    "LOWRANK_TENSORS": "4", "LOWRANK_GROUP": "0",
    "EVAL_STRIDE": "64", "TTT_EPOCHS": "3", "TTT_LR": "0.002", "TTT_PARAMS": "blocks.*",
    "LORA_TARGETS": "*.c_q,*.c_v", "LORA_RANK": "8", "LORA_LR": "0.01", "LORA_CHUNK_TOKENS": "256",
    "LORA_WARM_A": "0", "LORA_SCALE": "1.0", "LORA_BETA1": "0.9", "LORA_BETA2": "0.95", "LORA_EPS": "1e-8",
    "LORA_WD": "0.0", "PHASED_TTT_ENABLED": "0", "TRAIN_STREAM": "0",
}
# STACK=1090: #1090's run (openai/parameter-golf #1090, 1.1573 after LoRA TTT on one H100 PCIe; docs/stack-1090.md) on
# top of STACK=1.1194's: 11 x 512, SwiGLU with hidden 1024, XSA on the last 4 layers, full RoPE, its fixed SmearGate,
# orthogonal init, Muon without weight decay (its script never passes MUON_WD on), linear warmdown over 3,000 steps
# of time, SWA every 200 steps of it, 524,288 tokens per step (8 micro-steps on one GPU), 4,850 s; int5 MLP, int6
# attention, int8 embedding at each row's |w|max, zstd; rank-8 LoRA TTT on Q and V, 256-token chunks on their own.
STACK_1090_PRESET = {
    "MLP_ACT": "swiglu", "MLP_MULT": "2", "ROPE_DIMS": "0", "LN_SCALE": "0", "SKIP_GATE": "0",
    "SMEAR_GATE": "0", "SMEAR_HALF": "1", "BIGRAM_BUCKETS": "0", "PARALLEL_RESID_FROM": "-1", "ORTHO_INIT": "1",
    "QK_GAIN_INIT": "1.5", "SOFTCAP_FP32": "0", "ROPE_FP32": "0", "SDP_BACKENDS": "flash",
    "DOC_ATTENTION": "0", "TRAIN_BATCH_TOKENS": "524288", "MAX_WALLCLOCK_SECONDS": "4850", "WARMDOWN_FRAC": "0",
    "WARMDOWN_ITERS": "3000", "MUON_WD": "0", "MUON_ROW_NORM": "0", "GRAD_CLIP_NORM": "0", "EMA_DECAY": "0",
    "SWA_EVERY": "200", "GPTQ": "0", "QUANT_MLP": "int5", "SDCLIP_K_ATTN": "0", "SDCLIP_K_MLP": "0",
    "SDCLIP_K_EMBED": "0", "QUANT_CONTROL": "fp16", "QUANT_FLOAT_MAX": "896", "COMPRESSOR": "zstd", "EVAL_STRIDE": "0",
    "LORA_TTT_ENABLED": "1", "LORA_LR": "0.05", "LORA_SCALE": "0.125", "LORA_BETA2": "0.999", "LORA_A_STD": "0.01",
    "LORA_B_STD": "0.001", "LORA_CHUNK_CONTEXT": "1", "EVAL_MAX_SECONDS": "86400",
}
# SMOKE=1 STACK=1090: its 4 layers with XSA on the last 2, warmdown over the last 30 of 80 steps with SWA every 5, its
# LoRA TTT (alone: no sliding windows, no full TTT) on the val split's first 8 documents.
SMOKE_1090_PRESET = {"XSA_LAST_N": "2", "WARMDOWN_ITERS": "30", "SWA_EVERY": "5", "VAL_DOCS": "8", "LORA_SLOTS": "8",
                     "TTT_ENABLED": "0", "EVAL_STRIDE": "0"}

# STACK=1108: openai/parameter-golf #1108's nGPT (1.1502 sliding, 8xH200, 560 s) as its README's record ran it
# (NGPT_ENABLED=1 NGPT_FULL=1 NGPT_WEIGHT_NORM=1 NGPT_QUANT_MODE=renorm NUM_LAYERS=12 BIGRAM_VOCAB_SIZE=8192
# XSA_LAST_N=4, its other defaults), on STACK=1.1194's sp1024 data; docs/stack-1108.md says what differs.
STACK_1108_PRESET = {
    "MODEL": "ngpt", "NGPT_PARAM": "1108", "NUM_LAYERS": "12", "BIGRAM_BUCKETS": "8192", "DOC_ATTENTION": "0",
    "NGPT_MATRIX_LR": "0.025", "NGPT_SCALAR_LR": "0.025", "NGPT_EMBED_LR": "0.035", "MUON_MOMENTUM": "0.99",
    "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500", "MUON_BACKEND_STEPS": "4",
    "MUON_ROW_NORM": "0", "MUON_NS_COEFFS": "rowsum", "ADAM_WD": "0.04", "EMBED_WD": "0.04", "WARMDOWN_FRAC": "0",
    "WARMDOWN_ITERS": "3500", "EMA_WARMUP": "0", "MAX_WALLCLOCK_SECONDS": "560", "COMPRESSOR": "zstd",
    # its mixed_quantize_int6: int6 GPTQ with its clip search, embeddings int8 per tensor, fp16 up to 65,536 values,
    # 4% of the codes zeroed among the +-1 ones
    "GPTQ_FP64": "0", "GPTQ_DAMP_SORTED": "1", "QUANT_CLIP_SEARCH": "1", "QUANT_EMBED_PER_TENSOR": "1",
    "QUANT_FLOAT_MAX": "65536", "QUANT_CONTROL": "fp16", "QUANT_PRUNE_ONES": "0.04",
}
# SMOKE=1 STACK=1108: no TTT (#1108 has none: NaN on its renormalized weights), a smaller bigram table, and matrices
# over 4,096 values quantized (at 128 wide none has over its 65,536).
SMOKE_1108_PRESET = {"TTT_ENABLED": "0", "BIGRAM_BUCKETS": "1024", "QUANT_FLOAT_MAX": "4096"}

# STACK=1520: #1520's run (seed-42 log; ../shared/reference/pr1520) on top of STACK=1855's, the closest stack: plain
# sp8192 data, its gated attention, two lanes and "NorMuon", Norm-PCT-Dropout, int8 embedding + brotli, sliding SGD TTT.
STACK_1520_PRESET = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp8192", "TOKENIZER_PATH": "./data/tokenizers/fineweb_8192_bpe.model",
    "SOFTCAP_FP32": "0", "ROPE_FP32": "0", "QK_GAIN_INIT": "5.25", "DOC_ATTENTION": "0", "NORM_PCT_DROPOUT": "0.01",
    "ATTN_GATE_DIMS": "512", "ATTN_GATE_SCALE": "1.0", "ATTN_GATE_BIAS": "2.94", "ATTN_GATE_MUON": "1",
    "PARALLEL_LANES_FROM": "7", "PARALLEL_LANES_MERGE": "1", "SMEAR_GATE": "0", "MATRIX_LR": "0.022",
    "MUON_MOMENTUM": "0.99", "BETA2": "0.95", "MUON_NS_COEFFS": "quintic", "MUON_BF16": "0",
    "MUON_POST_NS_ROW_NORM": "1", "WARMDOWN_FRAC": "0.72", "MIN_LR": "0.0", "TRAIN_LOADER": "shuffled",
    "QUANT_EMBED": "int8", "SDCLIP_K_ATTN": "12.85", "SDCLIP_K_MLP": "12.85", "SDCLIP_K_EMBED": "20.0",
    "QUANT_GATE": "float", "GPTQ_CALIB_BATCHES": "64", "GPTQ_RESERVE_SECONDS": "12.0", "LOWRANK_RANK": "0",
    "COMPRESSOR": "brotli", "EVAL_STRIDE": "64", "TTT_ENABLED": "1", "TTT_EPOCHS": "3", "TTT_LR": "0.005",
    "PHASED_TTT_ENABLED": "0", "TRAIN_STREAM": "0", "GRAD_CLIP_SCOPE": "global",
}
# SMOKE=1 STACK=1520: its loop and lanes fitted to the smoke's 4 layers, the gate to its 128 dims, #2014's smoke scale
# of training, and its TTT (3 epochs per chunk) on the val split's first 8 documents in 2,048-token chunks.
SMOKE_1520_PRESET = {"RECUR_LAYERS": "1-2", "PARALLEL_LANES_FROM": "3", "ATTN_GATE_DIMS": "128", "ITERATIONS": "40",
                     "TRAIN_BATCH_TOKENS": "4096", "MUON_MOMENTUM_WARMUP_STEPS": "20", "QUANT_FLOAT_MAX": "4096",
                     "GPTQ_CALIB_BATCHES": "4", "VAL_DOCS": "8", "TTT_CHUNK_TOKENS": "2048", "TTT_EPOCHS": "3"}

# BASELINE=1: the starter's configuration, for every default of the record stack (docs/frontier.md);
# SMOKE=1 and explicit env vars win over it, so SMOKE=1 BASELINE=1 is the starter at the smoke scale.
BASELINE_PRESET = {
    "NUM_LAYERS": "9", "MLP_MULT": "2", "MLP_ACT": "relu2", "ROPE_DIMS": "0", "XSA_LAST_N": "0", "LN_SCALE": "0",
    "PARALLEL_RESID_FROM": "-1", "SKIP_GATE": "0", "SMEAR_GATE": "0", "BIGRAM_BUCKETS": "0", "QK_GAIN_INIT": "1.5",
    "TRAIN_BATCH_TOKENS": "524288", "TRAIN_SEQ_LEN": "1024", "EMA_DECAY": "0", "MUON_WD": "0", "MUON_ROW_NORM": "0",
    "WARMDOWN_FRAC": "0", "GRAD_CLIP_NORM": "0", "QUANT": "int8", "GPTQ": "0", "COMPRESSOR": "zlib", "EVAL_STRIDE": "0",
    "EXPORT_FORMAT": "starter", "CODE_PACK": "0", "SOFTCAP_FP32": "0", "ROPE_FP32": "0", "SDP_BACKENDS": "flash",
    "DOC_ATTENTION": "0",
}
# STACK=<name>: the stack it starts from (None: the default) and the settings it changes on top of that one's, and
# the settings SMOKE=1 changes on top of SMOKE_PRESET there (a stack's own smoke preset, not its base's).
STACKS = {
    "2014": (None, {}, SMOKE_RECIPE_PRESET | SMOKE_2014_PRESET),
    "1855": ("2014", STACK_1855_PRESET, SMOKE_RECIPE_PRESET),
    "1.1194": ("1855", STACK_1194_PRESET, {}),
    "1090": ("1.1194", STACK_1090_PRESET, SMOKE_1090_PRESET),
    "1108": ("1.1194", STACK_1108_PRESET, SMOKE_1108_PRESET),
    "1520": ("1855", STACK_1520_PRESET, SMOKE_1520_PRESET),
}
STACK_ALIASES = {"1.0611": "1855"}


def stack_presets(name: str) -> dict[str, str]:
    """The settings STACK=name changes, its bases' first; an unknown name changes none (validate() refuses it)."""
    name = STACK_ALIASES.get(name, name)
    if name not in STACKS:
        return {}
    base, preset, _ = STACKS[name]
    return {**(stack_presets(base) if base else {}), **preset}
# [/presets]


class ConfigError(Exception):
    """Bad input: main() prints it as one line naming the file or variable and the fix."""


class LaunchError(ConfigError):
    """A stray or inconsistent torchrun variable: every process prints it, as there may be no rank 0."""


TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launch(env) -> None:
    """torchrun sets all of TORCHRUN_VARS; one set alone would score a wrong share of the data or wait for ranks
    that never come."""
    given = [k for k in TORCHRUN_VARS if k in env]
    if not given:
        return
    if len(given) < len(TORCHRUN_VARS):
        missing = ", ".join(k for k in TORCHRUN_VARS if k not in env)
        raise LaunchError(f"{', '.join(f'{k}={env[k]}' for k in given)} set without {missing}: launch with torchrun "
                          "(it sets them all) or unset them to run one process")
    try:
        world, rank, local = (int(env[k]) for k in TORCHRUN_VARS[:3])
    except ValueError:
        world = rank = local = -1
    if not 0 <= local <= rank < world:
        raise LaunchError(f"WORLD_SIZE={env['WORLD_SIZE']}, RANK={env['RANK']}, LOCAL_RANK={env['LOCAL_RANK']} are "
                          "inconsistent (integers, 0 <= LOCAL_RANK <= RANK < WORLD_SIZE): launch with torchrun")


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return raw == "1"


# Code a run reaches only with some settings (docs/counted-code.md): name -> whether these settings reach it. Its
# code is marked `# [name]` ... `# [/name]` (or one line ending in `# [name]`); the counted copy of a run leaves out
# every feature its settings do not reach, names them in DROPPED_FEATURES, and refuses settings that reach one.
FEATURES = {
    "presets": lambda a: a.smoke or a.baseline or a.stack != "2014",
    "ngpt": lambda a: a.model == "ngpt",
    "checkpoint": lambda a: a.checkpoint_every_seconds > 0 or bool(a.resume),
    "starter": lambda a: a.export_format == "starter",
    "shuffled": lambda a: a.train_loader == "shuffled",
    "ttt": lambda a: a.ttt_enabled,
    "lora_ttt": lambda a: a.lora_ttt_enabled,
    "qat": lambda a: a.qat_start < 1,
    "bigram": lambda a: a.bigram_buckets > 0,
    "smear_half": lambda a: a.smear_half,
    "swa": lambda a: a.swa_every > 0,
    "lora_init": lambda a: a.lora_a_std > 0 or a.lora_b_std > 0,
    "rowsum_ns": lambda a: a.muon_ns_coeffs == "rowsum",
    "quant_search": lambda a: a.gptq_damp_sorted or a.quant_clip_search or a.quant_embed_per_tensor or a.quant_prune_ones > 0,
    "gate_bias": lambda a: a.attn_gate_bias != 0,
    "gate_muon": lambda a: a.attn_gate_muon,
    "lane_merge": lambda a: a.parallel_lanes_merge,
    "codegen": lambda a: False,  # making a counted copy: a counted copy is its own counted code
}
DROPPED_FEATURES = ()  # what this file leaves out; a counted copy names them here


def refuse_dropped(args) -> None:
    reached = [name for name in DROPPED_FEATURES if FEATURES[name](args)]
    if reached:
        raise ConfigError(f"these settings need {', '.join(reached)}, which this counted copy of train_gpt.py left out "
                          f"(it was made for other settings); run the readable train_gpt.py")


def in_interval(value: float, interval: str) -> bool:
    """Whether value lies in an interval written "[lo, hi)" (square: closed, round: open)."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)


@dataclass(frozen=True)
class Derived:
    """A default that follows from the settings read before it (attributes of the Hyperparameters being built)."""
    doc: str
    rule: Callable


@dataclass(frozen=True)
class Setting:
    """One env var, declared once: reading, validation, the log and docs/settings.md derive from it. check: an
    interval "[lo, hi)" or a tuple of choices (each comma-separated item with many=True); model: the one MODEL that
    reads it, None for all."""
    name: str
    cast: Callable
    default: object
    check: str | tuple | None
    doc: str
    model: str | None = None
    many: bool = False

    def check_value(self, value) -> None:
        if isinstance(self.check, str) and not in_interval(value, self.check):
            raise ConfigError(f"{self.name}={value} is out of range: it must lie in {self.check}")
        if isinstance(self.check, tuple) and not set(value.split(",") if self.many else [value]) <= set(self.check):
            what = "a comma-separated subset" if self.many else "one"
            raise ConfigError(f"{self.name}={value!r} is unknown; choose {what} of {list(self.check)}")


S, COUNT, NONNEG, POS, FRAC, BETA = Setting, "[1, inf)", "[0, inf)", "(0, inf)", "[0, 1]", "[0, 1)"  # intervals
QUANTS = ("int5", "int6", "int7", "int8", "fp16")
# Every setting, in reading order (a Derived default reads only the ones above it), by section; docs/settings.md.
SETTING_SECTIONS = {
    "Run": (
        S("SMOKE", _flag, False, None, "the CPU smoke preset: tiny model, embedded dataset built on first use"),
        S("BASELINE", _flag, False, None, "the starter's configuration (on STACK=1.1194); SMOKE and explicit env win"),
        S("STACK", str, "2014", ("2014", "1855", "1.0611", "1.1194", "1520", "1108", "1090"),  # STACKS' names, aliases
          "a recipe by its record: 2014 (the default), 1855 (alias 1.0611), 1.1194 (the stack before them), 1520, "
          "1108 (nGPT), 1090 (a 1-GPU run): README, docs/stack-<name>.md"),
        S("DATA_PATH", str, "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", None,
          "folder of fineweb_train_*.bin / fineweb_val_*.bin shards (+ byte sidecar, manifest.json)"),
        S("TOKENIZER_PATH", str, "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", None,
          "SentencePiece model for the byte tables"),
        S("ALLOW_OTHER_TOKENIZER", _flag, False, None,
          "accept a tokenizer other than the one the data's manifest.json records (logged as a warning)"),
        S("RUN_ID", str, Derived("a random uuid", lambda a: str(uuid.uuid4())), None, "names logs/<RUN_ID>.txt"),
        S("SEED", int, 1337, "[0, 4294967295]", "seeds Python, NumPy and torch (NumPy's range)"),
        S("ALLOW_ENV", str, "", None, "env names the misspelling check lets through, comma-separated"),
        S("TOKEN_LOSS_PATH", str, "", None, "if set, save the submission's per-target losses (float32 .npy, nats)"),
        S("PLAN", _flag, False, None, "print the run's plan (docs/plan.md) and exit, training nothing"),
        S("PLAN_WORLD_SIZE", int, Derived("WORLD_SIZE if above 1, else 8",
                                          lambda a: a.world_size if a.world_size > 1 else 8), COUNT,
          "GPUs the plan is for"),
        S("PLAN_GPU", str, "H100", ("H100", "H200", "A100"), "GPU the plan is for"),
        S("PLAN_TORCH", str, Derived("the installed torch", lambda a: torch.__version__.split("+")[0]), None,
          "torch version whose autocast rules the plan follows"),
    ),
    "Training": (
        S("ITERATIONS", int, 20000, COUNT, "training steps at most"),
        S("WARMDOWN_ITERS", int, 1200, NONNEG, "linear LR decay over the last this-many steps (WARMDOWN_FRAC=0)"),
        S("WARMUP_STEPS", int, 20, NONNEG, "compile warm-up steps, undone before training starts"),
        S("TRAIN_BATCH_TOKENS", int, 786_432, COUNT, "global tokens per step"),
        S("TRAIN_SEQ_LEN", int, 3072, COUNT, "training sequence length (the last stage's, with TRAIN_SEQ_SCHEDULE)"),
        S("TRAIN_SEQ_SCHEDULE", str, Derived("1024@0.100,2048@0.700,3072@1.000 at TRAIN_SEQ_LEN=3072, else none",
                                             lambda a: "1024@0.100,2048@0.700,3072@1.000" if a.train_seq_len == 3072
                                             else ""), None,
          "progressive context (#2014): len@frac,...: each length trains until that fraction of training is done"),
        S("SEQ_CHANGE_WARMUP_STEPS", int, 32, NONNEG, "steps over which the LR ramps up again after a length change"),
        S("MAX_WALLCLOCK_SECONDS", float, 600.0, NONNEG, "training-time cap; 0: none"),
        S("GRAD_ACCUM_STEPS", int, 0, NONNEG, "micro-steps per step per process; 0: 8 // world_size, as the starter"),
        S("COMPILE", _flag, Derived("1 on CUDA, 0 on CPU", lambda a: torch.cuda.is_available()), None,
          "torch.compile the model and Muon's Newton-Schulz"),
        S("SDP_BACKENDS", str, "flash,mem_efficient,math", ("flash", "mem_efficient", "math", "cudnn"),
          "CUDA attention kernels PyTorch may pick from, the rest off", many=True),
        S("CHECKPOINT_EVERY_SECONDS", float, 0.0, NONNEG, "checkpoint every this many s of training; 0: on signals"),
        S("CHECKPOINT_DIR", str, Derived("checkpoints/<RUN_ID>", lambda a: f"checkpoints/{a.run_id}"), None,
          "folder of the checkpoints"),
        S("CHECKPOINT_KEEP", int, 2, COUNT, "keep the newest this-many checkpoints"),
        S("RESUME", str, "", None, "continue from a checkpoint file, or auto: the newest in CHECKPOINT_DIR"),
    ),
    "Evaluation": (
        S("VAL_BATCH_SIZE", int, 524_288, COUNT, "global tokens per validation batch"),
        S("VAL_DOCS", int, 0, NONNEG, "score only the val split's first N documents (0: all); logged as val_prefix:, "
          "never a submission score (records/verify.py refuses it)"),
        S("VAL_LOSS_EVERY", int, 1000, NONNEG, "validate every N steps and at the end; 0: only at the end"),
        S("TRAIN_LOG_EVERY", int, 200, NONNEG, "log the train loss every N steps (and the first 10)"),
        S("EVAL_SEQ_LEN", int, 0, NONNEG, "window of the sliding and TTT paths; 0: TRAIN_SEQ_LEN (logged resolved)"),
        S("EVAL_STRIDE", int, 0, NONNEG, "targets between sliding windows, at most EVAL_SEQ_LEN; 0: no sliding path"),
        S("EVAL_MAX_SECONDS", float, 540.0, NONNEG, "adaptive paths stop adapting past this pace; scoring goes on"),
        S("TTT_ENABLED", _flag, False, None, "score-first TTT path"),
        S("TTT_CHUNK_TOKENS", int, 32768, COUNT, "TTT chunk, scored then trained on as its whole EVAL_SEQ_LEN windows"),
        S("TTT_EPOCHS", int, 1, COUNT, "TTT SGD steps per chunk"),
        S("TTT_LR", float, 0.001, NONNEG, "TTT SGD learning rate, cosine-decayed over the chunks"),
        S("TTT_MOMENTUM", float, 0.9, BETA, "TTT SGD momentum"),
        S("TTT_GRAD_CLIP", float, 1.0, NONNEG, "TTT gradient-norm clip; 0: off"),
        S("TTT_PARAMS", str, "*", None, "parameters TTT adapts: comma-separated shell patterns over names"),
        S("LORA_TTT_ENABLED", _flag, False, None, "per-document LoRA TTT path"),
        S("LORA_TARGETS", str, "*.c_k,*.attn,*.mlp,tied_head,lm_head", None,
          "modules given adapters: comma-separated shell patterns over module names (#2014: no Q and V adapters)"),
        S("LORA_RANK", int, 80, COUNT, "adapter rank"),
        S("LORA_LR", float, 0.000075, NONNEG, "adapter Adam learning rate (#2014's 1e-4 x its local LR mult 0.75)"),
        S("LORA_CHUNK_TOKENS", int, 48, COUNT, "targets scored, then trained on, per document per step"),
        S("LORA_SLOTS", int, 24, COUNT, "documents adapted side by side per rank"),
        S("LORA_SHORT_CHUNKS", str, "256:8,2000:24", None,
          "phased TTT: tokens:chunk,...: a batch whose longest document has at most tokens is scored and trained in "
          "chunks of chunk (the first step that holds it), others in LORA_CHUNK_TOKENS; '' for none"),
        S("LORA_WARM_A", _flag, True, None, "a slot's A matrices carry over to its next document"),
        S("LORA_SCALE", float, 1.8, POS, "adapter output multiplier"),
        S("LORA_BETA1", float, 0.0, BETA, "adapter Adam beta1"),
        S("LORA_BETA2", float, 0.99, BETA, "adapter Adam beta2"),
        S("LORA_EPS", float, 1e-10, POS, "adapter Adam eps"),
        S("LORA_WD", float, 0.5, NONNEG, "adapter decoupled weight decay"),
        S("LORA_A_STD", float, 0.0, NONNEG, "adapters' A drawn from N(0, this); 0: uniform in +-1/sqrt(fan-in)"),
        S("LORA_B_STD", float, 0.0, NONNEG, "adapters' B drawn from N(0, this), one draw every document starts from; "
          "0: zero"),
        S("LORA_CHUNK_CONTEXT", _flag, False, None, "LORA_TTT_ENABLED's path: a chunk's targets see only the chunk's "
          "own tokens, not the document before it (#1090)"),
        S("PHASED_TTT_ENABLED", _flag, True, None, "phased TTT path (the 1.0611 record's): LoRA TTT + SGD phases"),
        S("PHASED_TTT_PREFIX_DOCS", int, 2500, NONNEG, "phased TTT: documents the model trains on; 0: LoRA only"),
        S("PHASED_TTT_NUM_PHASES", int, 1, COUNT, "phased TTT: global SGD passes over the prefix documents"),
    ),
    "Model": (
        S("MODEL", str, "gpt", ("gpt", "ngpt"), "architecture: the starter's GPT with options, or nGPT"),
        S("VOCAB_SIZE", int, 8192, "[2, inf)", "must equal the tokenizer's vocabulary"),
        S("NUM_LAYERS", int, 11, COUNT, "transformer blocks"),
        S("MODEL_DIM", int, 512, COUNT, "residual width"),
        S("NUM_HEADS", int, 8, COUNT, "attention heads"),
        S("NUM_KV_HEADS", int, 4, COUNT, "key/value heads (grouped-query attention)"),
        S("MLP_MULT", int, 4, COUNT, "MLP hidden width = MLP_MULT x MODEL_DIM"),
        S("TIE_EMBEDDINGS", _flag, True, None, "the output head shares the token embedding"),
        S("ROPE_BASE", float, 10000.0, POS, "rotary embedding base"),
        S("LOGIT_SOFTCAP", float, 30.0, POS, "logits = softcap * tanh(logits / softcap)", "gpt"),
        S("SOFTCAP_FP32", _flag, True, None, "the softcap in fp32; 0: in the logits' dtype (the starter's)", "gpt"),
        S("SOFTCAP_ASYM", _flag, True, None, "#2014's asymmetric softcap: two caps at LOGIT_SOFTCAP that nothing trains",
          "gpt"),
        S("ROPE_FP32", _flag, True, None, "RoPE's angles stay fp32 under a bf16 body; 0: bf16 (the starter's)"),
        S("QK_GAIN_INIT", float, 5.25, POS, "initial per-head query gain after QK-norm", "gpt"),
        S("TIED_EMBED_INIT_STD", float, 0.005, NONNEG, "init std of the tied embedding", "gpt"),
        S("DOC_ATTENTION", _flag, True, None, "attention within documents (each BOS starts one), training and eval"),
        S("TRAIN_STREAM", _flag, True, None, "DOC_ATTENTION in training and TTT's SGD: a batch's rows are one stream, "
          "documents cut every row length (#2014's); 0: at row starts"),
        S("MLP_ACT", str, "leaky2", ("relu2", "leaky2", "swiglu"), "MLP activation", "gpt"),
        S("NORM_PCT_DROPOUT", float, 0.0, BETA, "in training, zero the MLP hidden rows whose norm reaches their "
          "(1 - this) quantile", "gpt"),
        S("ROPE_DIMS", int, 16, NONNEG, "partial RoPE: rotated dims per head (even); 0: all"),
        S("XSA_LAST_N", int, 11, NONNEG, "XSA on the last N layers: the own-value projection removed", "gpt"),
        S("ATTN_GATE_DIMS", int, 12, NONNEG, "per-head sigmoid attention gate read from the first N dims; 0: off"),
        S("ATTN_GATE_MAX", float, 1.0, POS, "attention gate = ATTN_GATE_MAX * sigmoid(ATTN_GATE_SCALE * w . x)"),
        S("ATTN_GATE_SCALE", float, 0.5, POS, "scale of the attention gate's logit"),
        S("ATTN_GATE_BIAS", float, 0.0, "(-inf, inf)",
          "initial learned per-head bias added to the gate's logit w . x; 0: none"),
        S("ATTN_GATE_MUON", _flag, False, None, "the attention gate's matrix trained by Muon as a block matrix; 0: Adam"),
        S("VALUE_EMBED_LAYERS", int, 0, NONNEG, "the last N layers add a shared value embedding", "gpt"),
        S("LN_SCALE", _flag, True, None, "block norms scaled by 1/sqrt(layer+1)", "gpt"),
        S("ORTHO_INIT", _flag, True, None, "orthogonal init of every non-zero-init linear weight", "gpt"),
        S("PARALLEL_RESID_FROM", int, -1, "[-1, inf)", "parallel residuals from this layer on; -1: off", "gpt"),
        S("PARALLEL_LANES_FROM", int, Derived("8; -1 with PARALLEL_RESID_FROM on or NUM_LAYERS <= 8",
                                              lambda a: 8 if a.parallel_resid_from < 0 and a.num_layers > 8 else -1),
          "[-1, inf)", "two-lane parallel decoder from this layer on; -1: off", "gpt"),
        S("PARALLEL_LANES_MERGE", _flag, False, None, "lanes without cross terms, the attention lane's residual mixed "
          "with x0, merged by a learned weight; 0: per-layer lambdas, lanes averaged", "gpt"),
        S("SKIP_GATE", _flag, True, None, "U-Net skips mixed in through a learned sigmoid gate", "gpt"),
        S("SMEAR_GATE", _flag, True, None, "SmearGate: mix in the previous token's embedding (not across BOS)", "gpt"),
        S("SMEAR_HALF", _flag, False, None, "after the embedding's norm, each position's mean with the previous "
          "position's, no gate, across BOS too (#1090's SmearGate, whose gate no optimizer holds)", "gpt"),
        S("SMEAR_GATE_DIMS", int, Derived("12; 0 with SMEAR_GATE=0", lambda a: 12 if a.smear_gate else 0), NONNEG,
          "SmearGate's gate read from the first N dims; 0: the per-dim mix", "gpt"),
        S("BIGRAM_BUCKETS", int, 0, NONNEG, "BigramHash buckets of (previous, current) token; 0: off (1 refused)"),
        S("BIGRAM_DIM", int, 128, COUNT, "BigramHash embedding width"),
        S("RECUR_LAYERS", str, Derived("3-5; empty below 6 layers", lambda a: "3-5" if a.num_layers >= 6 else ""), None,
          "depth recurrence: layers first-last rerun as a loop once on; empty: off", "gpt"),
        S("RECUR_LOOPS", int, 3, "[2, inf)", "passes over RECUR_LAYERS once recurrence is on", "gpt"),
        S("RECUR_START_FRAC", float, 0.35, FRAC, "recurrence switches on after this fraction of the run", "gpt"),
        S("NGPT_PARAM", str, "paper", ("paper", "1108"), "nGPT's parametrization: the paper's, or openai/parameter-golf "
          "#1108's (docs/stack-1108.md); the NGPT_ settings below it reads: ALPHA_INIT and the learning rates", "ngpt"),
        S("NGPT_ALPHA_INIT", float, 0.05, POS, "initial step size alpha of every residual update", "ngpt"),
        S("NGPT_ALPHA_SCALE", float, Derived("1/sqrt(MODEL_DIM)", lambda a: a.model_dim ** -0.5), POS,
          "alpha stored as this, used times ALPHA_INIT / ALPHA_SCALE", "ngpt"),
        S("NGPT_LOGIT_SCALE_INIT", float, 1.0, POS, "initial per-vocabulary logit scale s_z", "ngpt"),
        S("NGPT_NORM_EMBED", _flag, False, None, "the token embedding's rows on the sphere too", "ngpt"),
        S("NGPT_OPAQUE_NORM", _flag, True, None, "normalize through one opaque fp32 op under torch.compile", "ngpt"),
        # [ngpt]
        S("NGPT_ADD_RESIDUAL", _flag, False, None, "h <- norm(h + alpha * block(h)) (seed 001): no -h term, the block's "
          "output not normalized, alpha one signed scalar per update", "ngpt"),
        S("NGPT_COSINE_LOGITS", _flag, False, None, "logits = s_z * cos(h, output row), s_z one learnable scalar from "
          "NGPT_LOGIT_SCALE_INIT (seed 001: 10), no softcap", "ngpt"),
        S("NGPT_PROJECT_EVERY", int, 1, COUNT, "lazy projection: the sphere matrices are put back on the sphere after "
          "every Nth optimizer step only", "ngpt"),
        S("NGPT_GEODESIC", _flag, False, None, "Muon rotates each unit row (column) along the tangent part of its step "
          "(the sphere's exp map) instead of stepping off the sphere and projecting back", "ngpt"),
        # [/ngpt]
        S("NGPT_MATRIX_LR", float, 0.04, NONNEG, "Muon LR of the sphere matrices", "ngpt"),
        S("NGPT_EMBED_LR", float, 0.05, NONNEG, "Adam LR of the token embedding", "ngpt"),
        S("NGPT_HEAD_LR", float, 0.008, NONNEG, "Adam LR of an untied output head", "ngpt"),
        S("NGPT_SCALAR_LR", float, 0.04, NONNEG, "Adam LR of alpha, s_qk, s_uv and s_z", "ngpt"),
    ),
    "Optimizers": (
        S("EMBED_LR", float, 0.6, NONNEG, "Adam LR of an untied embedding", "gpt"),
        S("HEAD_LR", float, 0.008, NONNEG, "Adam LR of an untied output head", "gpt"),
        S("TIED_EMBED_LR", float, 0.03, NONNEG, "Adam LR of the tied embedding", "gpt"),
        S("MATRIX_LR", float, 0.026, NONNEG, "Muon LR of block matrices", "gpt"),
        S("SCALAR_LR", float, 0.02, NONNEG, "Adam LR of gains, mixes and skip weights", "gpt"),
        S("MUON_MOMENTUM", float, 0.97, BETA, "Muon momentum after warm-up"),
        S("MUON_BACKEND_STEPS", int, 5, COUNT, "Newton-Schulz iterations"),
        S("MUON_MOMENTUM_WARMUP_START", float, 0.92, BETA, "Muon momentum at step 0"),
        S("MUON_MOMENTUM_WARMUP_STEPS", int, 1500, NONNEG, "steps of linear momentum warm-up"),
        S("BETA1", float, 0.9, BETA, "Adam beta1"),
        S("BETA2", float, 0.99, BETA, "Adam beta2"),
        S("ADAM_EPS", float, 1e-8, POS, "Adam epsilon"),
        S("GRAD_CLIP_NORM", float, 0.3, NONNEG, "gradient-norm clip; 0: off"),
        S("GRAD_CLIP_SCOPE", str, "rank", ("rank", "global"), "rank: each GPU clips its own gradients, then they are "
          "averaged (#1855/#2014); global: the averaged gradients are clipped by their norm (one GPU: the same)"),
        S("MUON_NS_COEFFS", str, "polar_express_plain", ("quintic", "polar_express", "polar_express_plain", "rowsum"),
          "Newton-Schulz coefficients (rowsum: #1108's row-scaled start, for MUON_BACKEND_STEPS=4)"),
        S("MUON_BF16", _flag, True, None, "Muon's momentum and Newton-Schulz in bf16 on every device"),
        S("MUON_ROW_NORM", _flag, True, None, "MuonEq-R: momentum rows normalized before Newton-Schulz"),
        S("MUON_POST_NS_ROW_NORM", _flag, False, None, "update rows scaled to unit norm after Newton-Schulz"),
        S("NORMUON_BETA2", float, 0.0, BETA, "NorMuon's per-neuron second-moment beta2; 0: off"),
        S("MUON_WD", float, 0.095, NONNEG, "decoupled weight decay of Muon matrices", "gpt"),
        S("ADAM_WD", float, 0.02, NONNEG, "decoupled weight decay of Adam parameters"),
        S("EMBED_WD", float, 0.085, NONNEG, "decoupled weight decay of the embedding tables"),
        S("CAUTIOUS_WD", _flag, False, None, "decay only where the step already moves the weight toward zero"),
        S("WARMDOWN_FRAC", float, 0.85, FRAC, "if > 0: warm down over this fraction of the run, not WARMDOWN_ITERS"),
        S("MIN_LR_FRAC", float, 0.0, FRAC, "warmdown ends at this fraction of each LR"),
        S("MIN_LR", float, 0.1, FRAC, "floor of the LR multiplier"),
        S("EMA_DECAY", float, 0.9965, BETA, "if > 0: an fp32 EMA of the weights replaces them at the end"),
        S("EMA_WARMUP", _flag, False, None, "the EMA's decay warmed up as min(EMA_DECAY, n / (n + 9))"),
        S("SWA_EVERY", int, 0, NONNEG, "SWA: an fp32 sum of the weights every N steps of the warmdown; their mean "
          "replaces them at the end (with 2 or more); 0: off"),
        S("TRAIN_LOADER", str, "sequential", ("sequential", "shuffled"), "order of the training sequences"),
        S("PREFETCH_BATCHES", int, 2, NONNEG, "batches a background thread builds ahead; 0: none"),
    ),
    "Export": (
        S("EXPORT_FORMAT", str, "pgolf", ("pgolf", "starter"), "this script's export, or the starter's int8 + zlib"),
        S("QUANT", str, "int6", QUANTS, "precision of block matrices (per row); names the format"),
        S("QUANT_ATTN", str, Derived("QUANT", lambda a: a.quant), QUANTS, "precision of .attn. matrices"),
        S("QUANT_MLP", str, Derived("QUANT", lambda a: a.quant), QUANTS, "precision of every other block matrix"),
        S("QUANT_EMBED", str, "int7", QUANTS, "precision of the embedding and output head"),
        S("SDCLIP_K_ATTN", float, 13.0, NONNEG, "SDClip: clip rows at k standard deviations (attention matrices); "
          "0: at |w|max"),
        S("SDCLIP_K_MLP", float, 11.5, NONNEG, "SDClip k of the other block matrices"),
        S("SDCLIP_K_EMBED", float, 14.0, NONNEG, "SDClip k of the embedding and head"),
        S("QUANT_GATE", str, "int8", ("float", "int8"), "attention-gate matrices: float, or int8 per row at |w|max"),
        S("QUANT_CONTROL", str, "fp16", ("fp32", "fp16"), "how control tensors kept float are stored"),
        S("QUANT_FLOAT_MAX", int, 65_536, NONNEG, "matrices of at most this many values stay float, as the records"),
        S("QAT_START", float, 1.0, FRAC, "fraction of training after which matrices train fake-quantized; 1: never"),
        S("GPTQ", _flag, True, None, "GPTQ on Hessians from training batches; 0: round to nearest"),
        S("GPTQ_EMBED", _flag, True, None, "GPTQ for the embedding too"),
        S("GPTQ_CALIB_BATCHES", int, 2, COUNT, "training batches read for the Hessians"),
        S("GPTQ_RESERVE_SECONDS", float, 4.0, NONNEG, "seconds of MAX_WALLCLOCK_SECONDS kept for the calibration"),
        S("GPTQ_DAMP", float, 0.01, NONNEG, "damping added to the Hessian diagonal, times its mean"),
        S("GPTQ_BLOCK", int, 128, COUNT, "GPTQ column block size"),
        S("GPTQ_FP64", _flag, False, None, "invert the Hessian in float64; 0: float32, as the 1.0611 record"),
        S("GPTQ_DAMP_SORTED", _flag, False, None, "damp the Hessian after sorting its columns (#1108's order; 0: before, "
          "the 1.0611 record's): the damping's mean summed in that order, the order from the undamped diagonal"),
        S("QUANT_CLIP_SEARCH", _flag, False, None, "per matrix, the row clip (|w| quantile .999, .9995, .9999, .99999 or "
          "max; at least 1.0) of least squared rounding error over the matrix, #1108's; 0: SDClip"),
        S("QUANT_EMBED_PER_TENSOR", _flag, False, None, "embedding tables and head int8 with one |w|max scale per "
          "tensor, no GPTQ (#1108's)"),
        S("QUANT_PRUNE_ONES", float, 0.0, BETA, "zero this fraction of all codes, at random among the +-1 codes "
          "(all |code| <= 1 if too few), #1108's PRUNE_PCT; 0: off"),
        S("QUANT_PRUNE_SEED", int, 42, NONNEG, "seed of QUANT_PRUNE_ONES' draws (#1108's torch.manual_seed(42))"),
        S("AWQ_GROUPS", int, 1, NONNEG, "AWQ-lite (#2014): this many groups of input columns, of most activation RMS x "
          "mean |w| over every GPTQ matrix, on the finer AWQ_BITS grid; 0: off"),
        S("AWQ_GROUP_SIZE", int, 64, COUNT, "AWQ-lite's group of input columns"),
        S("AWQ_BITS", int, 8, "[2, 8]", "AWQ-lite's grid, in bits"),
        S("LOWRANK_RANK", int, 4, NONNEG, "rank of the low-rank correction of quantization errors; 0: off"),
        S("LOWRANK_TENSORS", int, 3, NONNEG, "matrices (largest errors first) given the correction"),
        S("LOWRANK_GROUP", int, 64, NONNEG, "0: fp16 factors; g: int2 A, int4 B in groups of g"),
        S("COMPRESSOR", str, "zpaqg", None, "artifact compressor: zpaqg (ZPAQ by tensor group, parallel blocks), "
          "zpaq, brotli, lzma, zstd, zlib, or best: the smallest of zlib, zstd, lzma, brotli"),
        S("BYTE_SHUFFLE", _flag, True, None, "store multi-byte tensors byte-plane by byte-plane"),
        S("CODE_PACK", _flag, True, None, "count (and write) the self-extracting packed copy of the script"),
        S("SIZE_MARGIN_BYTES", int, 0, NONNEG, "the cap remedy aims this many bytes under the cap"),
        S("ARTIFACT_PATH", str, Derived("final_model.<QUANT>.pgolf (.ptz: EXPORT_FORMAT=starter)", lambda a: (
            f"final_model.{a.quant}.{'ptz' if a.export_format == 'starter' else 'pgolf'}")), None,
          "where the artifact is written"),
        S("SCORE_ARTIFACT", str, "", None, "if set, train nothing: score this artifact in a fresh process"),
    ),
}
SETTINGS = {s.name: s for section in SETTING_SECTIONS.values() for s in section}


# Settings a resumed run may change (docs/run.md "Checkpoints and resume"): where things are, what is logged, the cap.
# The checkpoint ones are not stored in the artifact: a resumed run exports the same bytes as an uninterrupted one.
CHECKPOINT_SETTINGS = frozenset("CHECKPOINT_EVERY_SECONDS CHECKPOINT_DIR CHECKPOINT_KEEP RESUME".split())
RESUME_MAY_DIFFER = CHECKPOINT_SETTINGS | frozenset("ALLOW_ENV RUN_ID DATA_PATH TOKENIZER_PATH ARTIFACT_PATH TOKEN_LOSS_PATH "
                                                    "TRAIN_LOG_EVERY VAL_LOSS_EVERY MAX_WALLCLOCK_SECONDS PREFETCH_BATCHES "
                                                    "ALLOW_OTHER_TOKENIZER".split())
# What the env may set when scoring an artifact (SCORE_ARTIFACT): where things are, how it is evaluated; the rest is
# the artifact's.
SCORE_MAY_SET = RESUME_MAY_DIFFER | frozenset("SCORE_ARTIFACT VAL_BATCH_SIZE COMPILE SDP_BACKENDS".split())
SCORE_MAY_SET_PREFIXES = ("EVAL_", "TTT_", "LORA_", "PHASED_TTT_", "PLAN")


def available_compressors() -> list[str]:
    """COMPRESSOR's choices: every compressor whose module imports here (brotli and zpaq are optional)."""
    names = []
    for name, module in (("zlib", "zlib"), ("zstd", "zstandard"), ("lzma", "lzma"), ("brotli", "brotli"),
                         ("zpaq", "zpaq"), ("zpaqg", "zpaq")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            pass
    return names


def grad_accum(args: Hyperparameters, world_size: int) -> int:
    # GRAD_ACCUM_STEPS=0 keeps the starter's 8 // world_size, so the global batch is the same on 1 to 8 GPUs.
    return args.grad_accum_steps or max(1, 8 // world_size)


class Hyperparameters:
    """Every setting of SETTINGS, read from the environment (or a mapping, for tests) into the attribute of its name
    in lower case; `settings` holds the resolved values of those this MODEL reads. validate() checks them all before
    any data is read."""

    def __init__(self, env=None):
        env = dict(os.environ if env is None else env)
        self.explicit = frozenset(env)  # set by the user, not by a preset
        self.unused_env: list[str] = []  # SCORE_ARTIFACT: env settings the artifact's own replace
        # [presets]
        baseline, smoke = env.get("BASELINE") == "1", env.get("SMOKE") == "1"
        stack = "1.1194" if baseline else STACK_ALIASES.get(env.get("STACK", "2014"), env.get("STACK", "2014"))
        presets = {**stack_presets(stack), **(BASELINE_PRESET if baseline else {}),
                   **(SMOKE_PRESET | smoke_cache(env.get("VOCAB_SIZE", SMOKE_PRESET["VOCAB_SIZE"])) if smoke else {}),
                   **(STACKS[stack][2] if smoke and stack in STACKS else {})}
        env = {**presets, **env}
        # [/presets]
        self.settings: dict[str, object] = {}
        self.world_size = int(env.get("WORLD_SIZE", "1"))  # torchrun's; needed by the batch rule
        model = env.get("MODEL", "gpt")
        for s in SETTINGS.values():
            raw, read = env.get(s.name), s.model in (None, model)  # the other model's settings keep their defaults
            try:
                value = s.cast(raw) if raw is not None and read else \
                    s.default.rule(self) if isinstance(s.default, Derived) else s.default
            except ValueError as e:
                kind = s.cast.__name__.lstrip("_")
                raise ConfigError(f"{s.name}={raw!r} is not a valid {kind} ({e}); fix or unset it")
            setattr(self, s.name.lower(), value)
            if read:
                self.settings[s.name] = value
        self.train_files = os.path.join(self.data_path, "fineweb_train_*.bin")
        self.val_files = os.path.join(self.data_path, "fineweb_val_[0-9]*.bin")  # not the fineweb_val_bytes_* sidecar
        # The resolved evaluation length and stride are what the log and the artifact record.
        self.eval_seq_len = self.settings["EVAL_SEQ_LEN"] = self.eval_seq_len or self.train_seq_len
        self.eval_stride = self.settings["EVAL_STRIDE"] = min(self.eval_stride, self.eval_seq_len)
        refuse_dropped(self)
        self.validate()

    def validate(self) -> None:
        """Every rule of the configuration; the first broken one is raised as a one-line ConfigError."""
        typos = self.misspellings()
        if typos:
            names = ",".join(t.split()[1] for t in typos)
            raise ConfigError(f"{'; '.join(typos)}: fix the name, or set ALLOW_ENV={names} to run with it unread")
        for name, value in self.settings.items():
            SETTINGS[name].check_value(value)
        other = {s.name for s in SETTINGS.values() if s.model not in (None, self.model)} & self.explicit
        if other:
            raise ConfigError(f"{', '.join(sorted(other))}: not read by MODEL={self.model}; unset them")
        if "EVAL_ISOLATE_DOCS" in self.explicit:
            raise ConfigError("EVAL_ISOLATE_DOCS is gone: DOC_ATTENTION (default 1) keeps attention within documents in "
                              "training and every evaluation path; unset EVAL_ISOLATE_DOCS")
        if self.compressor not in [*available_compressors(), "best"]:
            raise ConfigError(f"COMPRESSOR={self.compressor!r} is unknown or not installed (brotli: pip install brotli; "
                              "zpaq: pip install zpaq); "
                              f"choose best or one of {available_compressors()}")
        # [starter]
        int8 = {v for name, v in self.settings.items() if SETTINGS[name].check == QUANTS} == {"int8"}
        if self.export_format == "starter" and (not int8 or self.compressor != "zlib" or self.lowrank_rank
                                                or self.qat_start < 1):
            raise ConfigError("EXPORT_FORMAT=starter is the starter's int8 + zlib export: set QUANT=int8 (QUANT_ATTN, "
                              "QUANT_MLP, QUANT_EMBED too), COMPRESSOR=zlib, LOWRANK_RANK=0, QAT_START=1 (BASELINE=1 does)")
        # [/starter]
        # [shuffled]
        if self.train_stream and self.train_loader == "shuffled":
            raise ConfigError("TRAIN_LOADER=shuffled deals sequences from anywhere, not one stream: set TRAIN_STREAM=0")
        # [/shuffled]
        if self.doc_attention and not {"mem_efficient", "math"} & set(self.sdp_backends.split(",")):
            raise ConfigError(f"DOC_ATTENTION=1 needs a masked-attention kernel where varlen_attn is missing (before "
                              f"sm80, GPTQ's fp32 calibration): add mem_efficient or math to SDP_BACKENDS={self.sdp_backends!r}")
        # attention and MLP matrices, embedding: a bound without building the model, far past what 16 MB can hold
        params = self.num_layers * self.model_dim ** 2 * (4 + 2 * self.mlp_mult) + 2 * self.vocab_size * self.model_dim
        if params > MAX_PARAMS:
            raise ConfigError(f"MODEL_DIM={self.model_dim}, NUM_LAYERS={self.num_layers}, MLP_MULT={self.mlp_mult}, "
                              f"VOCAB_SIZE={self.vocab_size} make about {params:.2e} parameters, over the {MAX_PARAMS:.2e} "
                              "this script builds (the 16 MB cap holds ~1.3e8 even at one bit each); lower them")
        head_dim = self.model_dim // self.num_heads
        if self.model_dim % self.num_heads or head_dim % 2:
            raise ConfigError(f"MODEL_DIM={self.model_dim} must split into NUM_HEADS={self.num_heads} heads of even size")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} must be a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        if self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head size {head_dim} (0: all)")
        if self.attn_gate_dims > self.model_dim:
            raise ConfigError(f"ATTN_GATE_DIMS={self.attn_gate_dims} must be at most MODEL_DIM={self.model_dim}")
        if self.bigram_buckets == 1:
            raise ConfigError("BIGRAM_BUCKETS=1 leaves no bucket for token pairs: use 0 (off) or at least 2")
        if self.smear_gate_dims > (self.model_dim if self.smear_gate else 0):
            raise ConfigError(f"SMEAR_GATE_DIMS={self.smear_gate_dims} needs SMEAR_GATE=1 and at most "
                              f"MODEL_DIM={self.model_dim} dims")
        self.recur_first, self.recur_last = self._recur_span()
        lanes = self.parallel_lanes_from
        if lanes >= 0 and (self.parallel_resid_from >= 0 or lanes <= self.recur_last):
            raise ConfigError(f"PARALLEL_LANES_FROM={lanes} needs PARALLEL_RESID_FROM=-1 and a layer past "
                              f"RECUR_LAYERS={self.recur_layers!r} (the lanes never re-enter a loop)")
        self.seq_stages = seq_stages(self.train_seq_schedule, self.train_seq_len)
        for seq_len, _ in self.seq_stages:  # every length fills the same batch: rows = tokens / length
            batch_unit = self.world_size * grad_accum(self, self.world_size) * seq_len
            if self.train_batch_tokens % batch_unit:
                raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of world_size "
                                  f"({self.world_size}) x grad_accum_steps x {seq_len} (TRAIN_SEQ_LEN and each length "
                                  f"of TRAIN_SEQ_SCHEDULE) = {batch_unit}")
        if self.max_wallclock_seconds > 0 and self.gptq and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ConfigError(f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time within "
                              f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}; lower it or raise the cap")
        if (self.ttt_enabled or self.phased_ttt_enabled) and self.ttt_chunk_tokens < self.eval_seq_len:
            raise ConfigError(f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens} must be at least EVAL_SEQ_LEN={self.eval_seq_len} "
                              "(a chunk is trained on as its whole sequences)")
        # [swa]
        if self.swa_every and (self.ema_decay > 0 or self.resume):
            raise ConfigError(f"SWA_EVERY={self.swa_every} averages the weights itself and its sums are not checkpointed: "
                              "set EMA_DECAY=0 and unset RESUME")
        # [/swa]
        # [checkpoint]
        if self.resume and self.score_artifact:
            raise ConfigError("RESUME continues a training run and SCORE_ARTIFACT trains nothing: unset one of them")
        # [/checkpoint]
        if (self.lora_ttt_enabled or self.phased_ttt_enabled) and self.lora_chunk_tokens > self.eval_seq_len:
            raise ConfigError(f"LORA_CHUNK_TOKENS={self.lora_chunk_tokens} must be at most EVAL_SEQ_LEN={self.eval_seq_len}")
        # [lora_ttt]
        if self.lora_ttt_enabled and self.lora_chunk_context and self.lora_chunk_tokens < 31:
            raise ConfigError(f"LORA_CHUNK_TOKENS={self.lora_chunk_tokens} with LORA_CHUNK_CONTEXT=1 would split documents "
                              "#1090 scores whole without adapting (under 32 tokens): set it to at least 31")
        # [/lora_ttt]
        try:
            steps = self.lora_short_chunks.split(",")
            self.short_chunks = sorted(tuple(int(v) for v in step.split(":")) for step in steps if step)
        except ValueError:
            self.short_chunks = [()]
        if not all(len(st) == 2 and st[0] > 0 and 0 < st[1] <= self.eval_seq_len for st in self.short_chunks):
            raise ConfigError(f"LORA_SHORT_CHUNKS={self.lora_short_chunks!r} must be 'tokens:chunk,...' with positive "
                              f"tokens and chunks of at most EVAL_SEQ_LEN={self.eval_seq_len} ('' for none)")

    def artifact_settings(self) -> dict[str, object]:
        # Not the run's name (a random uuid by default): same settings and seed, same artifact bytes.
        return {k: v for k, v in self.settings.items() if k not in CHECKPOINT_SETTINGS and k != "RUN_ID"}

    def _recur_span(self) -> tuple[int, int]:
        # RECUR_LAYERS "first-last" -> (first, last); (-1, -1) when off.
        if not self.recur_layers:
            return -1, -1
        try:
            first, last = (int(v) for v in self.recur_layers.split("-"))
        except ValueError:
            first, last = -1, -2
        if not 0 <= first <= last < self.num_layers:
            raise ConfigError(f"RECUR_LAYERS={self.recur_layers!r} must be 'first-last' within NUM_LAYERS={self.num_layers}")
        return first, last

    def misspellings(self) -> list[str]:
        """Env vars that look like a mistyped setting name (close to one, or one in lower case), with the likely
        intended name; ALLOW_ENV's are let through."""
        known = set(SETTINGS)
        out = []
        for key in sorted(self.explicit - known - set(self.allow_env.split(","))):
            if key.upper() in known:
                close = [key.upper()]
            else:
                close = difflib.get_close_matches(key, list(self.settings), n=1, cutoff=0.85) if key.isupper() else []
            if close:
                out.append(f"env {key} is not a setting; did you mean {close[0]}?")
        return out


# -----------------------------
# DATA
# -----------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def shard_token_count(file: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    if not file.is_file():
        raise ConfigError(f"{file}: not a file but matches the shard pattern; rename or move it out of DATA_PATH")
    header = np.fromfile(file, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        got = f"magic {int(header[0])}, version {int(header[1])}" if header.size >= 2 else "no header"
        raise ConfigError(
            f"{file}: not a challenge shard ({got}; expected magic {SHARD_MAGIC}, version {SHARD_VERSION}): "
            "re-download it or rebuild it with data/build_shards.py"
        )
    num_tokens = int(header[2])
    expected = 4 * HEADER_INTS + 2 * num_tokens
    size = file.stat().st_size
    if size != expected:
        raise ConfigError(
            f"{file}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes: "
            "it is truncated or corrupt; re-download it (python3 data/cached_challenge_fineweb.py replaces bad shards)"
        )
    if num_tokens == 0:  # no build writes one; the sequential loader would wait on it forever
        raise ConfigError(f"{file}: a valid header but 0 tokens; remove it or rebuild the data with "
                          "data/build_shards.py")
    return num_tokens


def load_data_shard(file, vocab_size: int | None = None) -> Tensor:
    file = Path(file)
    num_tokens = shard_token_count(file)
    tokens = np.fromfile(file, dtype="<u2", count=num_tokens, offset=4 * HEADER_INTS)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ConfigError(
            f"{file}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}: "
            "set VOCAB_SIZE to the tokenizer the shards were built with, or point DATA_PATH at matching shards"
        )
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def shard_files(pattern: str, split: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        folder = Path(pattern).parent.name
        variant = folder.removeprefix("fineweb10B_") if folder.startswith("fineweb10B_") else "sp8192_caseops"
        raise ConfigError(
            f"no {split} shards match {pattern}: download them with "
            f"`python3 data/cached_challenge_fineweb.py --variant {variant} --train-shards 80`, "
            "point DATA_PATH at a folder of fineweb_*.bin shards, or run with SMOKE=1 for the offline smoke dataset"
        )
    for f in files:
        shard_token_count(f)
    return files


def train_data_sha256(pattern: str) -> str:
    """The train shards' names and token counts, hashed: from their headers, cheap; RESUME compares it."""
    return hashlib.sha256(json.dumps([[f.name, shard_token_count(f)] for f in shard_files(pattern, "train")])
                          .encode()).hexdigest()


def load_validation_tokens(pattern: str, vocab_size: int | None = None, seq_len: int = 1) -> Tensor:
    """All val tokens, every shard in sorted order: the whole split is scored, in windows of up to seq_len."""
    tokens = torch.cat([load_data_shard(f, vocab_size) for f in shard_files(pattern, "val")]).contiguous()
    if tokens.numel() - 1 < seq_len:
        raise ConfigError(f"val split {pattern} has {tokens.numel()} tokens, fewer than one window of {seq_len + 1} "
                          "(TRAIN_SEQ_LEN or EVAL_SEQ_LEN, +1): use a longer val split or shorter sequences")
    return tokens


def load_val_byte_sidecar(data_path: str, num_tokens: int) -> Tensor | None:
    """Per val token, the UTF-8 bytes of the original text it covers (BOS: 0), from the fineweb_val_bytes_*.bin
    shards beside the val shards (CaseOps data ships them: its tokens spell a transformed text); None if absent."""
    files = sorted(Path(data_path).glob("fineweb_val_bytes_*.bin"))
    if not files:
        return None
    counts = torch.cat([load_data_shard(f) for f in files])
    if counts.numel() != num_tokens:
        raise ConfigError(f"DATA_PATH={data_path}: the val byte sidecar (fineweb_val_bytes_*.bin) has {counts.numel()} "
                          f"counts for {num_tokens} val tokens: it belongs to other shards; fetch or build them together")
    return counts.to(torch.int32)


# The val split is the challenge's first 50,000 documents. Val token counts (BOS included) of the published
# datasets, by folder name: public logs print the count less one, rounded down to a multiple of the eval length L,
# so the true count lies in [logged + 1, logged + L].
CHALLENGE_VAL_DOCS = 50_000
CHALLENGE_VAL_TOKENS = {
    "fineweb10B_sp1024": (62_021_633, 62_022_656),  # logged 62,021,632 at L=1024 (records from March 2026 on)
    "fineweb10B_sp8192": (40_540_161, 40_542_208),  # logged 40,540,160 at L=2048 (the 1.0810 record)
    # logged 47,851,520 at L=2048 (#1855); logs that keep the tail show 47,853,343 targets, i.e. 47,853,344 tokens
    "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved": (47_851_521, 47_853_568),
}


MANIFEST_FIELDS = ("variant", "val_docs", "shuffle_seed", "val_tokens", "challenge_docs", "tokenizer_sha256")


def read_manifest(data_path: str) -> dict | None:
    """The manifest.json data/build_shards.py writes beside its shards, with the fields read here; None if absent."""
    path = Path(data_path) / "manifest.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in MANIFEST_FIELDS if k not in m] if isinstance(m, dict) else ["not a JSON object"]
    except (OSError, ValueError) as e:
        missing = [repr(e)]
    if missing:
        raise ConfigError(f"{path} is unreadable or incomplete ({', '.join(missing)}); rebuild the data with "
                          "data/build_shards.py")
    return m


def check_val_split(data_path: str, num_tokens: int) -> None:
    """Refuse a val split that is not the challenge's first 50,000 documents (the rest would be in training),
    told cheaply: from the manifest.json data/build_shards.py writes beside its shards, else, for a published
    dataset's folder, from its val token count."""
    manifest_path, m = Path(data_path) / "manifest.json", read_manifest(data_path)
    if m is not None:
        variant, val_docs, shuffle_seed, val_tokens = (m[k] for k in MANIFEST_FIELDS[:4])
        challenge = m["challenge_docs"] or variant in CHALLENGE_VAL_TOKENS
        if val_tokens != num_tokens:
            raise ConfigError(f"{manifest_path} records {val_tokens} val tokens but the val shards hold {num_tokens}: "
                              "the shards changed since the build; rebuild them with data/build_shards.py")
        if challenge and (val_docs, shuffle_seed) != (CHALLENGE_VAL_DOCS, None):
            raise ConfigError(f"{manifest_path}: {variant} is built from the challenge's documents, but its val split is "
                              f"{val_docs} documents (shuffle seed {shuffle_seed}), not the first {CHALLENGE_VAL_DOCS}: "
                              "the other val documents are in training (issue #2127); rebuild with --val-docs 50000 "
                              "and no --shuffle-seed")
        return
    expected = CHALLENGE_VAL_TOKENS.get(Path(data_path).name)
    if expected and not expected[0] <= num_tokens <= expected[1]:
        raise ConfigError(f"DATA_PATH={data_path}: the val split has {num_tokens} tokens, but the published one (the "
                          f"first {CHALLENGE_VAL_DOCS} documents) has {expected[0]}-{expected[1]}: a build with fewer val "
                          "documents puts the rest into training (issue #2127: CaseOps prep's --val-docs=10000); "
                          "download it with data/cached_challenge_fineweb.py or rebuild it with data/build_shards.py")


def check_tokenizer_sha256(data_path: str, tokenizer_path: str, allowed: bool,
                           override: str = "ALLOW_OTHER_TOKENIZER=1") -> str:
    """Refuse a tokenizer other than the one the shards were built with (manifest.json records its sha256): one of
    the same vocabulary size counts other bytes per token, a wrong bpb. Returns the line to log."""
    m = read_manifest(data_path)
    if m is None:
        return f"tokenizer_check:none (no manifest.json in {data_path})"
    sha256 = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    if sha256 == m["tokenizer_sha256"]:
        return f"tokenizer_check:ok sha256:{sha256[:12]}"
    mismatch = (f"{tokenizer_path} (sha256 {sha256[:12]}) is not the tokenizer the shards in {data_path} were built "
                f"with (its manifest.json records {m['tokenizer_sha256'][:12]})")
    if not allowed:
        raise ConfigError(f"{mismatch}: point the tokenizer path at that one, or set {override} to score with this one")
    return f"warning:tokenizer_check:overridden by {override}: {mismatch}"


class TokenStream:
    # Reads shards in order and wraps around: deterministic, no sampling, no workers.
    def __init__(self, pattern: str, vocab_size: int):
        self.files = shard_files(pattern, "train")
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.tokens = load_data_shard(self.files[0], vocab_size)
        self.pos = 0

    def take(self, n: int) -> Tensor:
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = load_data_shard(self.files[self.file_idx], self.vocab_size)
                self.pos = 0
            k = min(n, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    # Each call takes one contiguous chunk of the stream and gives every rank a disjoint span of it;
    # the extra token per span lets (x, y) be built by shifting.
    def __init__(self, pattern: str, vocab_size: int, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(pattern, vocab_size)
        self.files = self.stream.files

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(dtype=torch.int64)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)

    def state_dict(self) -> dict:
        return {"file_idx": self.stream.file_idx, "pos": self.stream.pos}

    def load_state_dict(self, state: dict) -> None:
        self.stream.file_idx, self.stream.pos = state["file_idx"], state["pos"]
        self.stream.tokens = load_data_shard(self.files[self.stream.file_idx], self.stream.vocab_size)


# [shuffled]
class ShuffledTokenLoader:
    # Each shard in turn, at a random phase, cut into (seq_len + 1)-token sequences read in a random order;
    # every draw is seeded by (SEED, pass, shard), so all ranks agree and each call deals them disjoint sequences.
    # The position (pass, shard, sequences dealt from it) is all a checkpoint needs to continue the same order.
    def __init__(self, pattern: str, vocab_size: int, rank: int, world_size: int, seed: int):
        self.rank, self.world_size = rank, world_size
        self.files, self.vocab_size, self.seed = shard_files(pattern, "train"), vocab_size, seed
        self.position = (0, 0, 0)  # (epoch, shard, index into the shard's order) of the next sequence
        self.sequences, self.seq_len = None, 0

    def _sequences(self, seq_len: int):
        empty = 0  # shards in a row without a whole sequence: a full pass of them would loop forever
        while True:
            epoch, shard, start = self.position
            rng = torch.Generator().manual_seed(hash((self.seed, epoch, shard)) & (2**63 - 1))
            tokens = load_data_shard(self.files[shard], self.vocab_size)
            phase = int(torch.randint(seq_len, (1,), generator=rng))
            count = max((tokens.numel() - phase - 1) // seq_len, 0)
            empty = 0 if count else empty + 1
            if empty == len(self.files):
                raise ConfigError(f"train shards hold no sequence of TRAIN_SEQ_LEN+1={seq_len + 1} tokens; use more data")
            order = torch.randperm(count, generator=rng).tolist()
            for index in range(start, count):
                self.position = (epoch, shard, index + 1)
                j = order[index]
                yield tokens[phase + j * seq_len : phase + (j + 1) * seq_len + 1]
            self.position = (epoch + (shard + 1) // len(self.files), (shard + 1) % len(self.files), 0)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        if self.sequences is None or seq_len != self.seq_len:  # a new length reads on from the same position
            self.sequences, self.seq_len = self._sequences(seq_len), seq_len
        per_rank = global_tokens // (self.world_size * grad_accum_steps * seq_len)
        batch = [next(self.sequences) for _ in range(per_rank * self.world_size)]
        local = torch.stack(batch[self.rank * per_rank : (self.rank + 1) * per_rank]).to(dtype=torch.int64)
        return local[:, :-1], local[:, 1:]

    def state_dict(self) -> dict:
        return {"position": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.sequences = tuple(state["position"]), None
# [/shuffled]


# TRAIN_LOADER=<name> -> loader(args, rank, world_size). A loader's next_batch(global_tokens, seq_len,
# grad_accum_steps) returns this rank's (x, y) int64 host tensors; state_dict() is the position of its next batch.
TRAIN_LOADERS = {
    "sequential": lambda args, *where: DistributedTokenLoader(args.train_files, args.vocab_size, *where),
    "shuffled": lambda args, *where: ShuffledTokenLoader(args.train_files, args.vocab_size, *where, args.seed),  # [shuffled]
}


class BatchPrefetcher:
    """A train loader on the device: with depth > 0 a background thread builds the next `depth` batches (opening the
    next shard when one runs out) into pinned host memory while the model trains, and next_batch only starts their
    copy to the device; depth 0 builds each batch when asked. Either way the batches are the loader's, in its order,
    and state_dict() is the position of the next batch handed out, not of the ones read ahead: a checkpoint resumes
    as if nothing had been prefetched."""

    def __init__(self, loader, device: torch.device, depth: int):
        self.loader, self.device, self.depth = loader, device, depth
        self.files = loader.files
        self.pin = device.type == "cuda"
        self.position = loader.state_dict()
        self.shape = None  # the (global_tokens, seq_len, grad_accum_steps) the thread builds batches for
        self.queue, self.stop, self.thread = None, None, None

    def _build(self, shape: tuple) -> tuple:
        x, y = self.loader.next_batch(*shape)
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self.loader.state_dict()

    def _read_ahead(self, shape: tuple, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self._build(shape)
            except Exception as e:  # handed to next_batch, which raises it in the training thread
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    pass
            if isinstance(item, Exception):
                return

    def close(self) -> None:
        """Stop the thread and rewind the loader to the next batch not handed out."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None
            self.loader.load_state_dict(self.position)
        self.shape = None

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        shape = (global_tokens, seq_len, grad_accum_steps)
        if self.depth == 0:
            item = self._build(shape)
        else:
            if shape != self.shape:
                self.close()
                self.shape, self.queue, self.stop = shape, queue.Queue(self.depth), threading.Event()
                self.thread = threading.Thread(target=self._read_ahead, args=(shape, self.queue, self.stop), daemon=True)
                self.thread.start()
            item = self.queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
        x, y, self.position = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return self.position

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self.position = self.loader.state_dict()


# -----------------------------
# MODEL
# -----------------------------
# A model class takes Hyperparameters and returns per-token losses (B, T) from
# forward(input_ids, target_ids); with DOC_ATTENTION=1 (set_attention) its attention never crosses a BOS. For the
# optimizers it sorts its parameters by param_kind into param_groups() (matrix -> Muon; embed, head, scalar: Adam) with
# learning_rates(args) and weight_decays(args) per group. It hooks after_optimizer_step() and after_load() (weights
# replaced by the EMA or a dequantized copy): a sphere-constrained model renormalizes in both, and any code that
# steps an optimizer on it, test-time training included, calls after_optimizer_step().
# MODELS maps MODEL=<name> to the class.

# Small tensors that act as gains or mixes: kept in fp32, optimized by Adam, never quantized.
CONTROL_TENSOR_NAME_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates",
                                "attn_gate", "smear_gate", "lambda", "softcap_", "ve_gain", "attn_alpha", "mlp_alpha", "s_qk",
                                "s_uv", "s_z")
# Embedding tables (nn.Embedding weights) other than the token embedding.
TABLE_NAMES = ("bigram.", "value_embed.")


def param_kind(name: str, t: Tensor) -> str:
    """What a parameter (or state-dict tensor) is, by name and shape: 'embed' (token embedding), 'table' (other
    embedding tables), 'head' (untied output head), 'gate' (attention-gate matrix), 'control' (other gains and
    mixes), 'vector' (any other non-matrix), 'attn' (.attn. matrices), 'mlp' (every other matrix). The optimizer
    split (param_groups), the CUDA layout, QAT, the quantizer and the size estimate all ask this."""
    if t.ndim == 2 and "attn_gate" in name:
        return "gate"
    if any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS):
        return "control"
    if t.ndim != 2:
        return "vector"
    if "tok_emb" in name or "lm_head" in name:
        return "embed" if "tok_emb" in name else "head"
    if any(pat in name for pat in TABLE_NAMES):
        return "table"
    return "attn" if ".attn." in name else "mlp"


def kind_groups(named_params, group_of: dict[str, str]) -> dict[str, list[nn.Parameter]]:
    """A model's param_groups(): each parameter in the optimizer group its kind maps to, in the given order."""
    groups = {"matrix": [], "embed": [], "head": [], "scalar": []}
    for name, p in named_params:
        groups[group_of[param_kind(name, p)]].append(p)
    return groups


class CastedLinear(nn.Linear):
    # fp32 weights for the optimizer, cast to the activation dtype at matmul time. QAT: with qat set (configure_qat
    # installs the export grid's rounding), the forward uses it (straight-through gradient) while the qat_on buffer
    # is 1; a buffer, not a Python flag, because torch.compile freezes Python flags but reads buffers on every call.
    qat: Callable[[Tensor], Tensor] | None = None  # [qat]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat is not None:  # [qat]
            w = w + self.qat_on * (self.qat(w.detach()) - w.detach())  # [qat]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float, train_seq_len: int):
        super().__init__()
        self.train_seq_len = train_seq_len
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype, pos: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq
        if seq_len > self.train_seq_len:
            # NTK-aware scaling for a context `factor` x the trained one: base -> base * factor^(d/(d-2)) keeps the
            # highest frequency and slows the lowest by factor, so its angles stay in the trained range (2 dims: kept).
            d = 2 * inv_freq.numel()
            scale = (seq_len / self.train_seq_len) ** (-torch.arange(0, d, 2, device=device) / max(d - 2, 1))
            inv_freq = (inv_freq * scale).to(self.inv_freq.dtype)
        # Positions and angles in inv_freq's dtype, as the starter: fp32, or bf16 with ROPE_FP32=0 (cuda_layout).
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=inv_freq.dtype), inv_freq)
        freqs = freqs[None, None] if pos is None else freqs[pos][:, None]  # pos: doc_positions
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def enable_sdp_backends(names: str) -> None:
    """SDP_BACKENDS: the CUDA attention kernels PyTorch may choose from, the others switched off."""
    for backend in SETTINGS["SDP_BACKENDS"].check:
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend in names.split(","))


# Attention kernels (docs/model.md "Attention"): the log's attention:kernel= line names the one a run uses. Plain causal
# attention is SDPA (fa3: routed to FlashAttention 3 through PyTorch's registry; flash: PyTorch's FlashAttention 2;
# sdpa: PyTorch's choice, on CPU or before sm80). DOC_ATTENTION=1 packs documents for varlen_attn (fa3_varlen, varlen)
# on CUDA; elsewhere a dense document mask (sdpa_masked) is the reference the packed path is tested against.
PACKED_KERNELS = ("fa3_varlen", "varlen")
# A packed row holds at most T // MIN_DOC_TOKENS + 2 segments (its start and its BOS): enough when every document has
# MIN_DOC_TOKENS tokens or more. The count depends only on the batch shape, so a compiled graph never recompiles for
# a new document layout; past it, a row's extra documents share its last segment (attention as with DOC_ATTENTION=0,
# within that row only: a segment never crosses a row, so overlapping evaluation windows never see each other). A
# stream (TRAIN_STREAM) is one row whose segments (documents and cuts) need that average: 1,538 in 98,304 tokens.
MIN_DOC_TOKENS = 64


def attention_kernel(device_type: str, doc_attention: bool, capability: int, fa3_installed: bool) -> tuple[str, str]:
    """The attention kernel for a device (CUDA compute capability major, 0 when unknown) and why; a pure function."""
    if device_type != "cuda" or capability < 8:  # varlen_attn and FlashAttention need sm80 or newer
        if doc_attention:
            return "sdpa_masked", "no CUDA device of sm80 or newer for varlen_attn: SDPA with a dense document mask"
        return "sdpa", "no CUDA device of sm80 or newer for FlashAttention: causal SDPA, PyTorch's kernel choice"
    if fa3_installed and capability == 9:
        return ("fa3_varlen" if doc_attention else "fa3"), "flash_attn_interface installed on sm90: PyTorch routes to FA3"
    why = "PyTorch's FlashAttention 2 (FA3 needs sm90 and flash_attn_interface)"
    return ("varlen" if doc_attention else "flash"), why


def attention_support(device: torch.device) -> tuple[int, bool]:
    """(compute capability major, whether flash_attn_interface is importable): what attention_kernel decides on."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0, False
    return torch.cuda.get_device_capability(device)[0], importlib.util.find_spec("flash_attn_interface") is not None


def doc_positions(input_ids: Tensor) -> Tensor:
    """Each token's position in its segment when the (B, T) batch is one stream cut at each BOS and every T tokens
    from a document's start (the stream's first token starts one)."""
    n = torch.arange(input_ids.numel(), device=input_ids.device)
    begin = torch.where((input_ids.flatten() == BOS_ID) | (n == 0), n, 0).cummax(0).values
    return ((n - begin) % input_ids.size(1)).view_as(input_ids)


def doc_mask(input_ids: Tensor) -> Tensor:
    """(B, 1, T, T) boolean mask: query i sees key j <= i of the same document (each BOS starts one)."""
    doc = (input_ids == BOS_ID).cumsum(1)
    causal = torch.ones(input_ids.size(1), input_ids.size(1), dtype=torch.bool, device=input_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def doc_cu_seqlens(input_ids: Tensor) -> Tensor:
    """Segment boundaries of the flattened (B, T) batch for varlen_attn: a segment starts at every row start and every
    BOS. int32, B * K + 1 entries for K = T // MIN_DOC_TOKENS + 2 slots per row (at most T), unused slots being empty
    segments at the row's end; built on the device without a host sync."""
    B, T = input_ids.shape
    K = min(T // MIN_DOC_TOKENS + 2, T)
    device = input_ids.device
    starts = (input_ids == BOS_ID) | (torch.arange(T, device=device) == 0)
    segment = starts.cumsum(1) - 1
    # Each start writes its position into its segment's slot of its row; the rest go to a spare column K.
    slot = torch.where(starts & (segment < K), segment, K)
    row = torch.arange(B, device=device, dtype=torch.int32)[:, None] * T
    row_end = (row + T).expand(B, K + 1)
    cu = row_end.scatter(1, slot, row + torch.arange(T, device=device, dtype=torch.int32))[:, :K]
    return F.pad(cu.flatten(), (0, 1), value=B * T)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None) -> Tensor:
    """Causal attention within the segments of cu_seqlens, for (B, H, T, D) q and (B, KV, T, D) k, v: the batch is
    flattened to B * T tokens for varlen_attn and unflattened again."""
    B, H, T, D = q.shape
    # SDPA runs in autocast's dtype, varlen_attn (a custom op) takes what it is given: cast as SDPA would be.
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.size(1), D).to(dtype) for t in (q, k, v))
    y = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, T, T, scale=scale, window_size=(-1, 0), enable_gqa=H != k.size(1))
    return y.view(B, T, H, D).transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None,
                     cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal attention over (B, H, T, D), softmax scale `scale` (None: 1/sqrt(D)); within documents when given
    their doc_mask (SDPA) or doc_cu_seqlens (varlen_attn), else across the whole window."""
    if cu_seqlens is not None:
        return packed_attention(q, k, v, cu_seqlens, scale)
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask.size(-1) != q.size(2):  # a stream's (1, 1, B * T, B * T): each row's queries over all B * T keys
        k, v, mask = *(t.transpose(0, 1).flatten(1, 2)[None] for t in (k, v)), mask.view(q.size(0), 1, q.size(2), -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def set_attention(model: nn.Module, args: Hyperparameters, device: torch.device = torch.device("cpu")) -> None:
    # Shared by GPT and nGPT: DOC_ATTENTION and the kernel for the device the model runs on (build_model's).
    model.doc_attention = args.doc_attention
    model.attention_kernel = attention_kernel(device.type, args.doc_attention, *attention_support(device))[0]


def doc_layout(model: nn.Module, input_ids: Tensor, stream: bool = False) -> dict[str, Tensor]:
    """What causal_attention needs to keep every document apart (nothing with DOC_ATTENTION=0), built once per
    forward for all layers: doc_cu_seqlens for a packed kernel, else doc_mask; a stream's pos (doc_positions)."""
    if not model.doc_attention:
        return {}
    pos = doc_positions(input_ids) if stream else None
    # A stream: one row whose segment starts read as BOS tokens (its cuts take slots as documents do: MIN_DOC_TOKENS).
    ids = input_ids if pos is None else torch.where(pos == 0, BOS_ID, input_ids).view(1, -1)
    if model.attention_kernel in PACKED_KERNELS:
        return {"cu_seqlens": doc_cu_seqlens(ids), "pos": pos}
    return {"mask": doc_mask(ids), "pos": pos}


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # cos/sin may cover only the first dims of a head (partial RoPE); the rest pass through unrotated.
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output (B, H, T, D) its component along the token's own value vector
    (B, KV, T, D); query head h reads KV head h // (H // KV), as in grouped-query SDPA."""
    B, H, T, D = y.shape
    y = y.view(B, v.size(1), H // v.size(1), T, D)
    vn = F.normalize(v, dim=-1)[:, :, None]
    return (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, H, T, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int = 0):
        super().__init__()
        dim = args.model_dim
        self.num_heads, self.num_kv_heads = args.num_heads, args.num_kv_heads
        self.head_dim = dim // args.num_heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((args.num_heads,), args.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(args.rope_dims or self.head_dim, args.rope_base, args.train_seq_len)
        self.xsa = layer >= args.num_layers - args.xsa_last_n
        self.use_value_embed = layer >= args.num_layers - args.value_embed_layers
        if self.use_value_embed:
            self.ve_gain = nn.Parameter(torch.full((1,), 0.5))  # 1-D: the artifact packs no 0-d floats
        # Per-head output gate read from the first ATTN_GATE_DIMS input dims (all: gated attention; few: sparse gate):
        # max * sigmoid(scale * logit); the default max 2 makes the zero-initialized gate start as the identity.
        self.attn_gate = nn.Parameter(torch.zeros(args.num_heads, args.attn_gate_dims)) if args.attn_gate_dims else None
        if args.attn_gate_dims and args.attn_gate_bias:  # [gate_bias]
            self.attn_gate_bias = nn.Parameter(torch.full((args.num_heads,), args.attn_gate_bias))  # [gate_bias]
        self.attn_gate_max, self.attn_gate_scale = args.attn_gate_max, args.attn_gate_scale
        self.softmax_scale = None

    def forward(self, x: Tensor, docs: dict[str, Tensor], value_embed: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if self.use_value_embed:
            v = v + self.ve_gain.to(v.dtype) * value_embed
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.position_qk(q, k, *self.rotary(T, x.device, q.dtype, docs.get("pos")))
        y = causal_attention(q, k, v, self.softmax_scale, docs.get("mask"), docs.get("cu_seqlens"))
        if self.xsa:
            y = remove_self_value(y, v)
        if self.attn_gate is not None:
            logit = F.linear(x[..., : self.attn_gate.size(1)], self.attn_gate.to(x.dtype))
            if getattr(self, "attn_gate_bias", None) is not None:  # ATTN_GATE_BIAS's learned bias  # [gate_bias]
                logit = logit + self.attn_gate_bias.to(x.dtype)  # [gate_bias]
            gate = self.attn_gate_max * torch.sigmoid(self.attn_gate_scale * logit)
            y = y * gate.transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def position_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        # QK-norm, then RoPE, then a learnable per-head gain sets the attention temperature.
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        return q * self.q_gain.to(q.dtype)[None, :, None, None], k


def norm_pct_dropout(h: Tensor, frac: float) -> Tensor:
    # Norm-PCT-Dropout (openai/parameter-golf #1520): zero the token rows whose L2 norm reaches the (1 - frac) quantile.
    norms = h.detach().float().norm(dim=-1)
    keep = norms < torch.quantile(norms.flatten(), 1 - frac)
    return h * keep[..., None].to(h.dtype)


class MLP(nn.Module):
    # relu^2 (modded-nanogpt), leaky2 = LeakyReLU(0.5)^2, or swiglu: silu(fc(x)) * up(x), two matrices that Muon
    # orthogonalizes one by one (#1090).
    def __init__(self, args: Hyperparameters):
        super().__init__()
        hidden = args.mlp_mult * args.model_dim
        self.act, self.dropout = args.mlp_act, args.norm_pct_dropout
        self.fc = CastedLinear(args.model_dim, hidden, bias=False)
        self.up = CastedLinear(args.model_dim, hidden, bias=False) if self.act == "swiglu" else None
        self.proj = CastedLinear(hidden, args.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.up is not None:
            h = F.silu(h) * self.up(x)
        else:
            h = (F.leaky_relu(h, 0.5) if self.act == "leaky2" else torch.relu(h)).square()
        if self.training and self.dropout > 0:
            h = norm_pct_dropout(h, self.dropout)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int = 0):
        super().__init__()
        dim = args.model_dim
        self.attn = CausalSelfAttention(args, layer)
        self.mlp = MLP(args)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Learned mix of the running stream with the embedding stream x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1 / math.sqrt(layer + 1) if args.ln_scale else 1.0
        self.parallel = 0 <= args.parallel_resid_from <= layer  # attention and MLP read the same input

    def forward(self, x: Tensor, x0: Tensor, docs: dict[str, Tensor], value_embed: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = F.rms_norm(x, (x.size(-1),)) * self.norm_scale
        out = x + self.attn_scale.to(x.dtype) * self.attn(h, docs, value_embed)
        if not self.parallel:
            h = F.rms_norm(out, (x.size(-1),)) * self.norm_scale
        return out + self.mlp_scale.to(x.dtype) * self.mlp(h)

    def two_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, docs: dict[str, Tensor], value_embed: Tensor | None,
                  resid: Tensor, post: Tensor) -> tuple[Tensor, Tensor]:
        # Two-lane parallel block: attention reads lane0 (mixed with x0), the MLP reads lane1, and each lane keeps
        # resid[lane] of itself plus post[0, lane] of the attention output and post[1, lane] of the MLP output.
        mix, resid, post = self.resid_mix.to(lane0.dtype), resid.to(lane0.dtype), post.to(lane0.dtype)
        h = F.rms_norm(mix[0] * lane0 + mix[1] * x0, (lane0.size(-1),)) * self.norm_scale
        attn = self.attn_scale.to(lane0.dtype) * self.attn(h, docs, value_embed)
        mlp = self.mlp_scale.to(lane0.dtype) * self.mlp(F.rms_norm(lane1, (lane1.size(-1),)) * self.norm_scale)
        return (resid[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp,
                resid[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp)

    # [lane_merge]
    def separate_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, docs: dict[str, Tensor],
                       value_embed: Tensor | None) -> tuple[Tensor, Tensor]:
        # PARALLEL_LANES_MERGE (#1520's lanes): lane0 is an attention-only block, lane1 an MLP-only block.
        mix = self.resid_mix.to(lane0.dtype)
        lane0 = mix[0] * lane0 + mix[1] * x0
        attn = self.attn(F.rms_norm(lane0, (lane0.size(-1),)) * self.norm_scale, docs, value_embed)
        mlp = self.mlp(F.rms_norm(lane1, (lane1.size(-1),)) * self.norm_scale)
        return lane0 + self.attn_scale.to(lane0.dtype) * attn, lane1 + self.mlp_scale.to(lane1.dtype) * mlp
    # [/lane_merge]


# [bigram]
def bigram_buckets(input_ids: Tensor, buckets: int) -> Tensor:
    # Hash of (previous, current) token; a position with no previous token of its own document (window start,
    # BOS) gets the last bucket, so nothing leaks across a document boundary.
    prev = F.pad(input_ids[:, :-1], (1, 0))
    has_prev = (input_ids != BOS_ID) & (torch.arange(input_ids.size(1), device=input_ids.device) > 0)
    return torch.where(has_prev, (prev * 92821 + input_ids) % (buckets - 1), buckets - 1)
# [/bigram]


def attach_bigram(model: nn.Module, args: Hyperparameters) -> None:
    # BigramHash, shared by GPT and nGPT: a table of hashed token pairs, projected into the stream by a matrix that
    # starts at zero (model.bigram is None when BIGRAM_BUCKETS=0).
    model.bigram = nn.Embedding(args.bigram_buckets, args.bigram_dim) if args.bigram_buckets else None
    # [bigram]
    if model.bigram is not None:
        model.bigram_proj = CastedLinear(args.bigram_dim, args.model_dim, bias=False)
        model.bigram_proj._zero_init = True


def bigram_features(model: nn.Module, input_ids: Tensor) -> Tensor:
    return model.bigram_proj(model.bigram(bigram_buckets(input_ids, model.bigram.num_embeddings)))
# [/bigram]


class TiedHead(nn.Module):
    # The tied output projection as a module of its own (no weight: it reads the embedding's), so that a forward
    # hook sees the head's input and logits, as test-time LoRA's hooks do on every other projection.
    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight.to(x.dtype))


CLIP_BANKS = (("attn.c_q", "attn.proj"), ("attn.c_k", "attn.c_v"), ("mlp.fc",), ("mlp.proj",))
CLIP_ORDER = ("skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas", "smear_lambda", "softcap_pos",
              "softcap_neg", "tok_emb", "blocks.", "smear_gate")


class GPT(nn.Module):
    """The challenge starter's model (U-Net skips over a stack of pre-norm blocks, tied embeddings, softcap) with
    the architecture options on top; their defaults are the record stack (docs/frontier.md)."""
    gate_muon = False  # ATTN_GATE_MUON  # [gate_muon]

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        set_attention(self, args)
        self.logit_softcap, self.softcap_fp32 = args.logit_softcap, args.softcap_fp32
        if args.softcap_asym:  # 1-D: the artifact packs no 0-d floats
            self.softcap_pos, self.softcap_neg = (nn.Parameter(torch.full((1,), args.logit_softcap), requires_grad=False)
                                                  for _ in range(2))
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        attach_bigram(self, args)
        # SmearGate: per-dim mix with the previous token's embedding, sigmoid(3) ~ 0.95 keeps mostly the current one;
        # with SMEAR_GATE_DIMS, adds lambda * sigmoid(w . first dims) of it instead (both zero: off at init).
        self.smear_gate = self.smear_lambda = None
        if args.smear_gate:
            dims = args.smear_gate_dims
            self.smear_gate = nn.Parameter(torch.zeros(1, dims) if dims else torch.full((dim,), 3.0))
            self.smear_lambda = nn.Parameter(torch.zeros(1)) if dims else None
        self.smear_half = args.smear_half  # [smear_half]
        kv_dim = args.num_kv_heads * (dim // args.num_heads)
        self.value_embed = nn.Embedding(args.vocab_size, kv_dim) if args.value_embed_layers else None
        # The blocks' run order: each once, and with depth recurrence a second order that reruns the loop
        # recur_first..recur_last (recur_loops passes in all) before going on. Each order's first half stores U-Net
        # skips that its second half adds back in reverse, so the looped order pairs more of them.
        self.recur_first, self.recur_last, self.recur_loops = args.recur_first, args.recur_last, args.recur_loops
        self.orders = [list(range(args.num_layers))]
        if self.recur_last >= 0:
            once, end = self.orders[0], self.recur_last + 1
            self.orders.append(once[:end] + once[self.recur_first : end] * (self.recur_loops - 1) + once[end:])
        num_skips = len(self.orders[-1]) // 2
        # Both orders begin with the same encoder blocks (those before the loop's end): run once, outside the switch.
        self.shared_blocks = min(args.num_layers // 2, end) if self.recur_last >= 0 else args.num_layers
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim)) if args.skip_gate else None
        self.blocks = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.pass_blocks = None  # split_passes(): modules of their own for a looped block's later passes
        # Two lanes from decoder layer PARALLEL_LANES_FROM on, mixed per layer by these (rows for all layers, as #1855).
        self.lanes_from = args.parallel_lanes_from
        self.gate_muon = args.attn_gate_muon  # [gate_muon]
        self.lane_merge = None  # PARALLEL_LANES_MERGE: lane 0's weight in the merged output
        if self.lanes_from >= 0 and args.parallel_lanes_merge:  # [lane_merge]
            self.lane_merge = nn.Parameter(torch.full((1,), 0.5))  # [lane_merge]
        if self.lanes_from >= 0 and self.lane_merge is None:
            self.parallel_resid_lambdas = nn.Parameter(torch.full((args.num_layers, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(args.num_layers, 2, 2))
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, args.vocab_size, bias=False)
        self.tied_head = TiedHead() if args.tie_embeddings else None
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if args.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        # Extra embeddings start at the token embedding's small scale: at std 1 they drown it out.
        for emb in (self.bigram, self.value_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=args.tied_embed_init_std)
        for m in self.modules():
            if getattr(m, "_zero_init", False):
                nn.init.zeros_(m.weight)
            elif args.ortho_init and isinstance(m, CastedLinear):
                nn.init.orthogonal_(m.weight)
        # Depth recurrence: once on, the looped order runs. The switch is a buffer (the training loop flips it at
        # RECUR_START_FRAC) read by torch.cond, so a compiled graph takes the loop as soon as it flips, and the
        # artifact keeps it.
        self._recur_on = self.recur_last >= 0 and args.recur_start_frac <= 0  # the buffer's Python mirror, for eager
        if self.recur_last >= 0:
            self.register_buffer("recur_active", torch.tensor(self._recur_on))
            self.register_load_state_dict_post_hook(lambda m, _: m.set_recurrence(bool(m.recur_active)))

    def split_passes(self) -> None:
        """Each later pass k of a looped block i runs pass_blocks["i_k"]: new module objects holding the same
        parameters, so that hooks on them (LoRA TTT's adapters) act per pass, as the records' adapters per position."""
        later = {(i, order[:pos].count(i)) for order in self.orders for pos, i in enumerate(order)}
        shared = {id(t): t for t in (*self.parameters(), *self.buffers())}
        self.pass_blocks = nn.ModuleDict({f"{i}_{k}": copy.deepcopy(self.blocks[i], dict(shared))
                                          for i, k in sorted(later) if k})

    def set_recurrence(self, on: bool) -> None:
        self.recur_active.fill_(on)
        self._recur_on = on

    def forward(self, input_ids: Tensor, target_ids: Tensor, stream: bool = False) -> Tensor:
        docs = doc_layout(self, input_ids, stream)
        x = self.tok_emb(input_ids)
        if self.bigram is not None:  # [bigram]
            x = x + bigram_features(self, input_ids)  # [bigram]
        if self.smear_gate is not None:
            # Gate in the previous token's embedding; a BOS (and the window's first token) takes in nothing. A stream's
            # rows continue each other (the previous row's last token), as #2014's flat row.
            rows = x if docs.get("pos") is None else x.view(1, -1, x.size(-1))
            prev = F.pad(rows[:, :-1], (0, 0, 1, 0)).view_as(x) * (input_ids != BOS_ID)[..., None].to(x.dtype)
            if self.smear_lambda is None:
                x = torch.lerp(prev, x, torch.sigmoid(self.smear_gate).to(x.dtype))
            else:
                gate = torch.sigmoid(F.linear(x[..., : self.smear_gate.size(1)], self.smear_gate.to(x.dtype)))
                x = x + self.smear_lambda.to(x.dtype) * gate * prev
        x = F.rms_norm(x, (x.size(-1),))
        if self.smear_half:  # [smear_half]
            x = 0.5 * x + 0.5 * F.pad(x[:, :-1], (0, 0, 1, 0))  # [smear_half]
        value_embed = None if self.value_embed is None else self.value_embed(input_ids).to(x.dtype)
        x0, skips, shared = x, [], self.shared_blocks
        x = self.run_blocks(self.orders[0], range(shared), x, x0, skips, docs, value_embed)

        def rest(order: list[int]):
            positions = range(shared, len(order))
            return lambda x, *skips: self.run_blocks(order, positions, x, x0, list(skips), docs, value_embed)

        # Compiled: torch.cond keeps both orders in the graph. Eager: a plain branch (eager cond retraces per call) on
        # the buffer's Python mirror, as reading a GPU buffer would wait for the GPU on every forward.
        if len(self.orders) > 1 and torch.compiler.is_compiling():
            x = torch.cond(self.recur_active, rest(self.orders[1]), rest(self.orders[0]), (x, *skips))
        else:
            x = rest(self.orders[self._recur_on])(x, *skips)
        x = F.rms_norm(x, (x.size(-1),))
        logits = self.tied_head(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        if self.softcap_fp32:  # SOFTCAP_FP32=0: the starter's, tanh in the logits' dtype (bf16 under autocast)
            logits = logits.float()
        if hasattr(self, "softcap_pos"):  # detached: a TTT that unfreezes every parameter still leaves them alone
            cap = torch.where(logits > 0, self.softcap_pos.detach(), self.softcap_neg.detach()).to(logits.dtype)
            logits = cap * torch.tanh(logits / cap)
        else:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def run_blocks(self, order: list[int], positions: range, x: Tensor, x0: Tensor, skips: list[Tensor],
                   docs: dict[str, Tensor], value_embed: Tensor | None) -> Tensor:
        """The blocks at these positions of a run order: its first half appends to skips, its second half adds them
        back in reverse order; from layer lanes_from on, the second half runs two lanes (x is lane 0) and returns
        their mean."""
        half, lane1 = len(order) // 2, None
        for pos in positions:
            i, j = order[pos], pos - half
            k = order[:pos].count(i) if self.pass_blocks is not None else 0
            block = self.pass_blocks[f"{i}_{k}"] if k else self.blocks[i]
            two_lanes = j >= 0 and 0 <= self.lanes_from <= i
            if two_lanes and lane1 is None and self.lane_merge is None:
                lane1 = x
            if j >= 0 and skips:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + skip
                else:
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            if two_lanes and lane1 is None:  # #1520's lanes split after the skip  # [lane_merge]
                lane1 = x  # [lane_merge]
            if two_lanes and self.lane_merge is None:
                x, lane1 = block.two_lanes(x, lane1, x0, docs, value_embed, self.parallel_resid_lambdas[i],
                                                    self.parallel_post_lambdas[i])
            elif two_lanes:  # [lane_merge]
                x, lane1 = block.separate_lanes(x, lane1, x0, docs, value_embed)  # [lane_merge]
            else:
                x = block(x, x0, docs, value_embed)
            if j < 0:
                skips.append(x)
        if lane1 is not None and self.lane_merge is not None:  # [lane_merge]
            return self.lane_merge.to(x.dtype) * x + (1 - self.lane_merge.to(x.dtype)) * lane1  # [lane_merge]
        return x if lane1 is None else 0.5 * (x + lane1)

    # matrix -> Muon; embed, head, scalar -> Adam with their own learning rates.
    GROUP_OF = {"embed": "embed", "table": "embed", "head": "head", "gate": "scalar", "control": "scalar",
                "vector": "scalar", "attn": "matrix", "mlp": "matrix"}

    def clip_order(self) -> list[Tensor]:
        """The gradients as #1855/#2014's clip_grad_norm_ reads them: their banks (every layer's c_q then proj, c_k then
        c_v, fc, mlp.proj) flattened together, then their other tensors in their order. The same order gives the same
        fp32 norm to the last bit: a bf16 Muon step after a binding clip amplifies one ulp of it to ~5e-4."""
        named = {n: p for n, p in self.named_parameters() if p.requires_grad}
        grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad  # noqa: E731
        banks = [torch.cat([grad(named.pop(f"blocks.{i}.{n}.weight")).flatten() for n in names
                            for i in range(len(self.blocks))]) for names in CLIP_BANKS]
        rank = lambda n: next((k for k, pre in enumerate(CLIP_ORDER) if n.startswith(pre)), len(CLIP_ORDER))  # noqa: E731
        return banks + [named[n].grad for n in sorted(named, key=rank) if named[n].grad is not None]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.gate_muon:  # [gate_muon]
            return kind_groups(self.named_parameters(), {**self.GROUP_OF, "gate": "matrix"})  # [gate_muon]
        return kind_groups(self.named_parameters(), self.GROUP_OF)

    def learning_rates(self, args: Hyperparameters) -> dict[str, float]:
        return {"matrix": args.matrix_lr, "embed": args.tied_embed_lr if args.tie_embeddings else args.embed_lr,
                "head": args.head_lr, "scalar": args.scalar_lr}

    def weight_decays(self, args: Hyperparameters) -> dict[str, float]:
        return {"matrix": args.muon_wd, "embed": args.embed_wd, "head": args.adam_wd, "scalar": args.adam_wd}

    def after_optimizer_step(self) -> None:
        pass

    after_load = after_optimizer_step


# [ngpt]
class _SphereNormalize(torch.autograd.Function):
    # x / |x| over the last axis in (at least) fp32, returned in fp32, so the stream is never rounded to bf16 between
    # normalizations; with allow_in_graph it is one opaque node in Dynamo's graph with this hand-written backward,
    # not ops the compiler re-fuses across casts, where bf16 error compounded over ~80 normalizations
    # (openai/parameter-golf #1108).
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        inv = x32.square().sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()
        y = x32 * inv
        ctx.save_for_backward(y, inv)
        ctx.in_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        y, inv = ctx.saved_tensors
        grad = grad.float()
        return ((grad - y * (grad * y).sum(-1, keepdim=True)) * inv).to(ctx.in_dtype)


@torch._dynamo.allow_in_graph
def sphere_normalize(x: Tensor) -> Tensor:
    return _SphereNormalize.apply(x)


def plain_normalize(x: Tensor) -> Tensor:
    # The same fp32 math, but visible to the compiler (NGPT_OPAQUE_NORM=0, for comparison).
    return F.normalize(x.float(), dim=-1)


def sphere_linear(in_features: int, out_features: int, sphere_dim: int) -> CastedLinear:
    # A matrix kept at unit norm along its d_model axis: rows (dim 1) when it reads d_model, columns (dim 0)
    # when it writes it. NGPT.project_to_sphere reads _sphere_dim.
    m = CastedLinear(in_features, out_features, bias=False)
    m._sphere_dim = sphere_dim
    return m


class NGPTAttention(CausalSelfAttention):
    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__(args, layer)
        del self.q_gain
        for m in (self.c_q, self.c_k, self.c_v):
            m._sphere_dim = 1
        self.proj._sphere_dim = 0
        self.proj._zero_init = False  # a zero matrix has no direction on the sphere (openai/parameter-golf #1108)
        # No XSA: it zeroes the first token's output (it attends to itself only), which the block then normalizes.
        self.xsa = False
        self.norm = sphere_normalize if args.ngpt_opaque_norm else plain_normalize
        # s_qk multiplies q only: q.k then carries it once, as the paper's s_qk on both q and k carries it
        # squared, and grouped k heads need no copy. Stored as 1/sqrt(d), used times sqrt(d) (the paper's).
        self.s_qk = nn.Parameter(torch.full((args.model_dim,), args.model_dim ** -0.5))
        # q and k are unit vectors, so logits are cosines: the paper's softmax scale is sqrt(head_dim), applied once.
        self.softmax_scale = self.head_dim ** 0.5

    def position_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q, k = self.norm(apply_rotary_emb(q, cos, sin)), self.norm(apply_rotary_emb(k, cos, sin))
        s_qk = self.s_qk.view(self.num_heads, 1, self.head_dim) * self.s_qk.numel() ** 0.5
        return q * s_qk, k


class NGPTMLP(nn.Module):
    # SwiGLU at 2/3 of MLP_MULT x MODEL_DIM (a multiple of 16), so it has the relu^2 MLP's parameter count;
    # s_u and s_v (one vector s_uv) rescale the cosines fc produces, times sqrt(d), into the activation's range.
    def __init__(self, args: Hyperparameters):
        super().__init__()
        hidden = 16 * round(args.mlp_mult * args.model_dim / 24)
        self.fc = sphere_linear(args.model_dim, 2 * hidden, 1)
        self.proj = sphere_linear(hidden, args.model_dim, 0)
        self.s_uv = nn.Parameter(torch.ones(2 * hidden))
        self.gain = args.model_dim ** 0.5

    def forward(self, h: Tensor) -> Tensor:
        u, v = (self.fc(h) * (self.s_uv * self.gain)).chunk(2, dim=-1)
        return self.proj(u * F.silu(v))


class NGPTBlock(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__()
        dim = args.model_dim
        self.attn = NGPTAttention(args, layer)
        self.mlp = NGPTMLP(args)
        self.norm = self.attn.norm
        self.attn_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_scale))
        self.mlp_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_scale))
        self.alpha_gain = args.ngpt_alpha_init / args.ngpt_alpha_scale
        self.add_residual = args.ngpt_add_residual
        if self.add_residual:  # one alpha per update, stored and scaled as the per-dimension ones
            self.attn_alpha, self.mlp_alpha = (nn.Parameter(torch.tensor(args.ngpt_alpha_scale)) for _ in range(2))

    def forward(self, h: Tensor, docs: dict[str, Tensor]) -> Tensor:
        if self.add_residual:  # seed 001's rule: a signed step along the raw block output, then back onto the sphere
            h = self.norm(h + self.attn_alpha * self.alpha_gain * self.attn(h, docs))
            return self.norm(h + self.mlp_alpha * self.alpha_gain * self.mlp(h))
        # A step of size |alpha| (per dimension) from h toward the block's normalized output, back onto the sphere.
        h = self.norm(h + (self.attn_alpha * self.alpha_gain).abs() * (self.norm(self.attn(h, docs)) - h))
        return self.norm(h + (self.mlp_alpha * self.alpha_gain).abs() * (self.norm(self.mlp(h)) - h))


class NGPT(nn.Module):
    """nGPT (Loshchilov et al., arXiv 2410.01131): hidden states and matrices on the unit sphere, no norm layers,
    learned step sizes alpha, logits scaled per vocabulary entry by s_z. The 16 MB fixes (openai/parameter-golf
    #1108): no
    zero-initialized projections, a learnable logit scale, and (NGPT_NORM_EMBED=0) a free token embedding."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        set_attention(self, args)
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        if args.ngpt_norm_embed:
            self.tok_emb._sphere_dim = 1
        attach_bigram(self, args)  # off the sphere: its sum with the embedding is normalized
        self.blocks = nn.ModuleList(NGPTBlock(args, i) for i in range(args.num_layers))
        self.norm = self.blocks[0].norm
        self.lm_head = None if args.tie_embeddings else sphere_linear(dim, args.vocab_size, 1)
        self.s_z = nn.Parameter(torch.full((args.vocab_size,), dim ** -0.5))
        self.s_z_gain = args.ngpt_logit_scale_init * dim ** 0.5
        self.cosine_logits = args.ngpt_cosine_logits
        if self.cosine_logits:  # seed 001: one scalar, stored as itself
            self.s_z, self.s_z_gain = nn.Parameter(torch.tensor(args.ngpt_logit_scale_init)), 1.0
        self.geodesic, self.project_every, self.unprojected_steps = args.ngpt_geodesic, args.ngpt_project_every, 0
        # A loaded state (warm-up's restore, a resume) starts a new count of NGPT_PROJECT_EVERY steps.
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "unprojected_steps", 0))
        # Random unit rows (or columns) everywhere; free embeddings start with unit rows too; BigramHash's
        # projection starts at zero.
        for m in self.modules():
            if isinstance(m, (CastedLinear, nn.Embedding)):
                nn.init.normal_(m.weight)
                m.weight.data = F.normalize(m.weight.data, dim=getattr(m, "_sphere_dim", 1))
                if getattr(m, "_zero_init", False):
                    nn.init.zeros_(m.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, stream: bool = False) -> Tensor:
        docs = doc_layout(self, input_ids, stream)
        x = self.tok_emb(input_ids)
        h = self.norm(x if self.bigram is None else x + bigram_features(self, input_ids))
        for block in self.blocks:
            h = block(h, docs)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        if self.cosine_logits:  # unit rows: h is unit too, so F.linear gives the cosines
            w = self.norm(w)
        logits = (self.s_z * self.s_z_gain) * F.linear(h, w.to(h.dtype)).float()
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    # Sphere matrices (then projected), attention gates and BigramHash's projection -> Muon; embeddings, head,
    # alpha, s_qk, s_uv, s_z -> Adam.
    GROUP_OF = {**GPT.GROUP_OF, "gate": "matrix"}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        if self.geodesic:  # Muon's geodesic_step_ reads the axis from the parameters it is given, so tag them here
            for m in self.modules():
                if hasattr(m, "_sphere_dim"):
                    m.weight._geodesic_dim = m._sphere_dim
        # s_z, then the blocks, then the rest: the order its optimizers (and checkpoints) have always had
        named = sorted(self.named_parameters(), key=lambda np: (np[0] != "s_z", not np[0].startswith("blocks.")))
        return kind_groups(named, self.GROUP_OF)

    def learning_rates(self, args: Hyperparameters) -> dict[str, float]:
        return {"matrix": args.ngpt_matrix_lr, "embed": args.ngpt_embed_lr, "head": args.ngpt_head_lr,
                "scalar": args.ngpt_scalar_lr}

    def weight_decays(self, args: Hyperparameters) -> dict[str, float]:
        # None on the sphere matrices: project_to_sphere would undo it.
        return {"matrix": 0.0, "embed": args.embed_wd, "head": args.adam_wd, "scalar": args.adam_wd}

    @torch.no_grad()
    def project_to_sphere(self) -> None:
        """Unit norm, in fp32, along each constrained matrix's declared axis; a free embedding and control
        tensors are never touched. Weight decay on these matrices would be undone here, so none applies."""
        self.unprojected_steps = 0
        for m in self.modules():
            if hasattr(m, "_sphere_dim"):
                m.weight.copy_(F.normalize(m.weight.float(), dim=m._sphere_dim))

    def after_optimizer_step(self) -> None:
        # After Muon/Adam (or a TTT step): every NGPT_PROJECT_EVERY-th one projects (seed 001's lazy projection).
        self.unprojected_steps += 1
        if self.unprojected_steps >= self.project_every:
            self.project_to_sphere()

    # After the EMA or dequantization, which leave rows off the sphere.
    after_load = project_to_sphere


def geodesic_step_(p: Tensor, u: Tensor, lr: float) -> None:
    """NGPT_GEODESIC: each unit vector w of p along p._geodesic_dim moves by the exponential map of v, the tangent
    part of Muon's step -lr * u: w <- cos|v| w + sin|v| v / |v|, a rotation in the plane of w and v, so it stays on
    the sphere with no projection."""
    w = p.float()
    v = -lr * u.float()
    v = v - w * (v * w).sum(p._geodesic_dim, keepdim=True)
    angle = v.norm(dim=p._geodesic_dim, keepdim=True)
    p.copy_(w * angle.cos() + v * torch.sinc(angle / math.pi))  # sinc(a / pi) = sin(a) / a, 1 at a = 0


# NGPT_PARAM=1108: the parametrization of openai/parameter-golf #1108 (its NGPT_ENABLED=1 NGPT_FULL=1
# NGPT_WEIGHT_NORM=1 path), proven equal to its script in tests/test_p1108.py. The record's fixed choices are kept as
# its constants: XSA on the last 4 layers, value embeddings (128 wide) on layers 9 and 10 of 12, softcap 30.
NGPT1108_XSA_LAST, NGPT1108_VE_DIM, NGPT1108_SOFTCAP = 4, 128, 30.0


def normalize_as_input(x: Tensor) -> Tensor:
    # The opaque fp32 normalize, rounded back to x's dtype as #1108's L2NormalizeHP returns it.
    return sphere_normalize(x).to(x.dtype)


class SphereRowsLinear(CastedLinear):
    # Rows normalized in every forward (#1108's NGPT_WEIGHT_NORM): the stored matrix keeps any norm (weight decay
    # shrinks it, Muon's step is relative to it), the product reads unit rows.
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, normalize_as_input(self.weight.to(x.dtype)))


class NGPT1108Attention(CausalSelfAttention):
    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__(args, layer)
        dim, kv_dim = args.model_dim, self.c_k.out_features
        self.c_q, self.c_k, self.c_v = (SphereRowsLinear(dim, n, bias=False) for n in (dim, kv_dim, kv_dim))
        self.proj = SphereRowsLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        # q and k RMS-normed, times per-head gains sqrt(head_dim) each, under the default 1/sqrt(head_dim) scale.
        self.q_gain.data.fill_(self.head_dim ** 0.5)
        self.k_gain = nn.Parameter(torch.full((self.num_kv_heads,), self.head_dim ** 0.5))
        # #1108's rotary assumes training at 1024 tokens: at 2048 its NTK scaling is on.
        self.rotary = Rotary(args.rope_dims or self.head_dim, args.rope_base, 1024)
        self.xsa = layer >= args.num_layers - NGPT1108_XSA_LAST
        self.use_value_embed = layer in (args.num_layers - 3, args.num_layers - 2)
        if self.use_value_embed:
            self.ve_gain = nn.Parameter(torch.ones(1))
        # Value residual: layers after the first mix in the first layer's values (detached), by sigmoid(gate).
        self.vrl_gate = nn.Parameter(torch.full((1,), -1.5)) if layer else None

    def forward(self, x: Tensor, docs: dict[str, Tensor], value_embed: Tensor | None,
                first_v: Tensor | None) -> tuple[Tensor, Tensor]:
        """The attention output and this layer's own values (B, KV, T, D), before the value residual."""
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if self.use_value_embed:
            v = v + self.ve_gain.to(v.dtype) * value_embed
        v = own_v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.vrl_gate is not None:
            gate = torch.sigmoid(self.vrl_gate.to(v.dtype))
            v = (1 - gate) * v + gate * first_v
        q, k = self.position_qk(q, k, *self.rotary(T, x.device, q.dtype, docs.get("pos")))
        y = causal_attention(q, k, v, None, docs.get("mask"), docs.get("cu_seqlens"))
        if self.xsa:
            y = remove_self_value(y, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), own_v

    def position_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q, k = super().position_qk(q, k, cos, sin)
        return q, k * self.k_gain.to(k.dtype)[None, :, None, None]


class NGPT1108MLP(nn.Module):
    # LeakyReLU(0.5)^2 on the cosines fc produces, rescaled per hidden unit by s_uv x sqrt(d).
    def __init__(self, args: Hyperparameters):
        super().__init__()
        hidden = args.mlp_mult * args.model_dim
        self.fc = SphereRowsLinear(args.model_dim, hidden, bias=False)
        self.proj = SphereRowsLinear(hidden, args.model_dim, bias=False)
        self.proj._zero_init = True
        self.s_uv = nn.Parameter(torch.ones(hidden))
        self.gain = args.model_dim ** 0.5

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x) * (self.s_uv.to(x.dtype) * self.gain)
        return self.proj(F.leaky_relu(h, 0.5).square())


class NGPT1108Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__()
        dim = args.model_dim
        self.attn = NGPT1108Attention(args, layer)
        self.mlp = NGPT1108MLP(args)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # alpha stored as the step size it is: no reparametrization, weight decay acts on it.
        self.attn_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_init))
        self.mlp_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_init))

    def forward(self, x: Tensor, x0: Tensor, docs: dict[str, Tensor], value_embed: Tensor | None,
                first_v: Tensor | None) -> tuple[Tensor, Tensor]:
        norm, mix = normalize_as_input, self.resid_mix.to(x.dtype)
        h = norm(mix[0] * x + mix[1] * x0)
        attn, own_v = self.attn(h, docs, value_embed, first_v)
        h = norm(h + self.attn_alpha.abs().to(h.dtype) * (norm(attn) - h))
        return norm(h + self.mlp_alpha.abs().to(h.dtype) * (norm(self.mlp(h)) - h)), own_v


class NGPT1108(nn.Module):
    """#1108's nGPT: the 1.1194-era GPT (BigramHash, SmearGate, U-Net skips, value embeddings, XSA, partial RoPE)
    with every block's input, attention and MLP outputs and updates on the sphere, every linear's rows normalized in
    the forward, a free token embedding (RMS-normed, then smeared, then normalized) and one logit scale sqrt(d)
    before the tanh softcap."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        seed001 = args.ngpt_add_residual or args.ngpt_cosine_logits or args.ngpt_geodesic or args.ngpt_project_every > 1
        if args.attn_gate_dims or args.qat_start < 1 or not args.tie_embeddings or seed001:
            raise ConfigError("NGPT_PARAM=1108 has no attention gate, QAT, untied head (#1108's record ran none) or seed "
                              "001's options: set ATTN_GATE_DIMS=0 QAT_START=1 TIE_EMBEDDINGS=1 (STACK=1108 does) and "
                              "unset NGPT_ADD_RESIDUAL, NGPT_COSINE_LOGITS, NGPT_PROJECT_EVERY, NGPT_GEODESIC")
        dim, layers = args.model_dim, args.num_layers
        set_attention(self, args)
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        self.bigram = nn.Embedding(args.bigram_buckets, args.bigram_dim) if args.bigram_buckets else None
        if self.bigram is not None:
            # #1108 projects a table only when its width differs from its target's (identity at equal widths).
            self.bigram_proj = SphereRowsLinear(args.bigram_dim, dim, bias=False) \
                if args.bigram_dim != dim else nn.Identity()
            self.bigram_scale = nn.Parameter(torch.full((1,), 0.05))
        self.smear_gate = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(NGPT1108Block(args, i) for i in range(layers))
        self.value_embed = None
        if any(b.attn.use_value_embed for b in self.blocks):
            self.value_embed = nn.Embedding(args.vocab_size, NGPT1108_VE_DIM)
            kv_dim = self.blocks[0].attn.c_k.out_features
            self.value_embed_proj = SphereRowsLinear(NGPT1108_VE_DIM, kv_dim, bias=False) \
                if kv_dim != NGPT1108_VE_DIM else nn.Identity()
            self.value_embed_scale = nn.Parameter(torch.full((1,), 0.1))
        self.skip_weights = nn.Parameter(torch.ones(min(layers // 2, layers - layers // 2), dim))
        self.logit_scale = nn.Parameter(torch.full((1,), dim ** 0.5))
        # #1108's init: embedding N(0, 0.005), bigram table 0, value table N(0, 0.01); output projections N(0, 0.01)
        # (zero has no direction); other matrices of at least 64 x 64 orthogonal, the projections' / sqrt(2 layers).
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        for name, m in self.named_modules():
            if getattr(m, "_zero_init", False):
                nn.init.normal_(m.weight, std=0.01)
            elif isinstance(m, CastedLinear) and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)
                if name.endswith("proj"):
                    m.weight.data /= (2 * layers) ** 0.5
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.weight)
        if self.value_embed is not None:
            nn.init.normal_(self.value_embed.weight, std=0.01)

    def bigram_ids(self, input_ids: Tensor) -> Tensor:
        # #1108's hash of (previous, current) token; the first position of a window gets the last bucket.
        t, last = input_ids.to(torch.int32), self.bigram.num_embeddings - 1
        pair = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % last
        return F.pad(pair, (1, 0), value=last).long()

    def forward(self, input_ids: Tensor, target_ids: Tensor, stream: bool = False) -> Tensor:
        docs, norm = doc_layout(self, input_ids, stream), normalize_as_input
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram_proj(self.bigram(self.bigram_ids(input_ids))) * self.bigram_scale.to(x.dtype)
        x = F.rms_norm(x, (x.size(-1),))
        gate = torch.sigmoid(self.smear_gate.to(x.dtype))
        x = x0 = norm((1 - gate) * x + gate * F.pad(x[:, :-1], (0, 0, 1, 0)))
        value_embed = None
        if self.value_embed is not None:
            value_embed = self.value_embed_proj(self.value_embed(input_ids)) * self.value_embed_scale.to(x.dtype)
        skips, half, first_v = [], len(self.blocks) // 2, None
        for i, block in enumerate(self.blocks):
            if i >= half and skips:
                x = x + self.skip_weights[i - half].to(x.dtype) * skips.pop()
            x, own_v = block(x, x0, docs, value_embed, first_v)
            first_v = own_v.detach() if i == 0 else first_v
            if i < half:
                skips.append(x)
        logits = F.linear(norm(x), self.tok_emb.weight.to(x.dtype)) * self.logit_scale.to(x.dtype)
        logits = NGPT1108_SOFTCAP * torch.tanh(logits / NGPT1108_SOFTCAP)
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    GROUP_OF = GPT.GROUP_OF
    param_groups, learning_rates = GPT.param_groups, NGPT.learning_rates
    gate_muon = False  # GPT.param_groups reads it  # [gate_muon]

    def weight_decays(self, args: Hyperparameters) -> dict[str, float]:
        # #1108 decays matrices by ADAM_WD too (its MUON_WD = ADAM_WD = 0.04), alpha included among the scalars.
        return {"matrix": args.adam_wd, "embed": args.embed_wd, "head": args.adam_wd, "scalar": args.adam_wd}

    def after_optimizer_step(self) -> None:
        pass

    def calibration_copy(self) -> None:
        """For collect_hessians' copy: GPTQ reads each matrix's inputs off F.linear on the parameter itself, so here the
        rows are normalized once and multiplied plainly (the same activations; row scales commute with GPTQ)."""
        for m in self.modules():
            if isinstance(m, SphereRowsLinear):
                m.weight.data = F.normalize(m.weight.data, dim=-1)
                m.forward = partial(CastedLinear.forward, m)

    @torch.no_grad()
    def after_load(self) -> None:
        """#1108's renormalization after dequantization: the blocks' matrices back to unit rows (the forward
        normalizes them anyway: this changes the weights' storage, not the function)."""
        for m in self.blocks.modules():
            if isinstance(m, SphereRowsLinear):
                m.weight.copy_(F.normalize(m.weight, dim=-1))  # fp32 weights (cuda_layout)
# [/ngpt]


MODELS = {
    "gpt": GPT,
    "ngpt": lambda args: NGPT1108(args) if args.ngpt_param == "1108" else NGPT(args),  # [ngpt]
}


def build_model(args: Hyperparameters, device: torch.device) -> nn.Module:
    model = MODELS[args.model](args)
    set_attention(model, args, device)
    if device.type == "cuda":
        cuda_layout(model, args)
    # The move comes last, after the dtypes: the plan (PLAN=1) moves a model built on the meta device onto fake
    # CUDA tensors in one step, since a fake tensor cannot be converted again.
    return model.to(device)


def cuda_layout(model: nn.Module, args: Hyperparameters) -> nn.Module:
    """The starter's precision layout on CUDA: bf16 body, fp32 linear weights and control tensors. Its .bfloat16()
    also rounds RoPE's inv_freq buffers, and so positions and angles, to bf16 (kept with ROPE_FP32=0)."""
    inv_freqs = {m: m.inv_freq for m in model.modules() if isinstance(m, Rotary)}
    model.bfloat16()
    for name, p in model.named_parameters():
        if isinstance(p, nn.Parameter) and param_kind(name, p) in ("gate", "control", "vector"):
            p.data = p.data.float()
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.float()
    if args.rope_fp32:
        for m, inv_freq in inv_freqs.items():
            m.inv_freq = inv_freq
    return model


def compiled(model: nn.Module, args: Hyperparameters, dynamic: bool | None = False) -> nn.Module:
    # One graph per input shape (dynamic=None: a size that changes becomes symbolic), no graph breaks (COMPILE=0: the
    # module itself, eager).
    return torch.compile(model, dynamic=dynamic, fullgraph=True) if args.compile else model


def autocast(device: torch.device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    # Before reading a clock: CUDA work is asynchronous.
    if device.type == "cuda":
        torch.cuda.synchronize()


def distributed_now() -> bool:
    return dist.is_available() and dist.is_initialized()


# -----------------------------
# OPTIMIZERS
# -----------------------------

# Polar Express (Amsel et al. 2025, arXiv 2505.16932): per-iteration (a, b, c) for 5 steps.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# MUON_NS_COEFFS=<name> -> (input norm safety factor, whether c scales A @ A rather than A, (a, b, c) per
# iteration; the last repeats). The two products round differently in bf16, enough to tell the runs apart.
NS_COEFFS = {
    "quintic": (1.0, False, ((3.4445, -4.7750, 2.0315),)),  # modded-nanogpt's classic quintic
    "polar_express": (1.02, False, POLAR_EXPRESS),  # as modded-nanogpt: the input norm inflated by 2e-2 for safety
    "polar_express_plain": (1.0, True, POLAR_EXPRESS),  # as the 1.0611 record (#1855, from #1344): the plain norm
    # [rowsum_ns]
    # #1108's: X's rows scaled by 1/sqrt of |X X^T|'s row sums in the first iteration (zeropower_via_newtonschulz5),
    # then the last 4 of its 5 tuned (a, b, c), as its MUON_BACKEND_STEPS=4 takes them.
    "rowsum": (1.0, False, ((3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                            (2.8366, -3.0525, 1.2012))),
    # [/rowsum_ns]
}


def zeropower_via_newtonschulz5(G: Tensor, steps: int, eps: float = 1e-7, coeffs: str = "quintic") -> Tensor:
    # Quintic Newton-Schulz iteration toward the nearest semi-orthogonal matrix (modded-nanogpt), over the last
    # two dims, so a stack of same-shape matrices goes in one batched call; bf16 on GPU, G's dtype on CPU (fp32,
    # or bf16 under MUON_BF16).
    safety, square_first, abc = NS_COEFFS[coeffs]
    X = G.to(torch.bfloat16 if G.is_cuda else G.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for i in range(steps):
        a, b, c = abc[min(i, len(abc) - 1)]
        A = X @ X.mT
        if i == 0 and coeffs == "rowsum":  # [rowsum_ns]
            s = A.abs().sum(-1).clamp_min(eps).rsqrt()  # [rowsum_ns]
            X, A = X * s[..., None], A * s[..., None] * s[..., None, :]  # [rowsum_ns]
        X = a * X + (b * A + (c * (A @ A) if square_first else c * A @ A)) @ X
    return X.mT if transposed else X


def rescale_rows_keeping_norm(g: Tensor, second_moment: Tensor) -> Tensor:
    # Divide each row (or column) by its RMS estimate, then restore each matrix's Frobenius norm (NorMuon); fp32.
    g = g.float()
    h = g * second_moment.clamp_min(1e-10).rsqrt()
    return h * (g.norm(dim=(-2, -1), keepdim=True) / h.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class Muon(torch.optim.Optimizer):
    """Muon: orthogonalized Nesterov momentum, one batched Newton-Schulz per group of same-shape matrices.
    Over several ranks a shape group is split into one contiguous chunk per rank: reduce_grads() launches one
    asynchronous reduce-scatter per group (DDP leaves these gradients alone: ddp_without_matrices), so a rank
    receives the mean gradients of its own chunk only; step() orthogonalizes its chunk, group by group, and launches
    an asynchronous all-gather of the updates, which travels while the next groups compute.
    Options: MuonEq-R (row_norm), post-NS row normalization, NorMuon (normuon_beta2 > 0), bf16 (the momentum and
    everything after it in bf16 on every device, as the 1.0611 record; else fp32 up to Newton-Schulz)."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, coeffs: str = "quintic",
                 row_norm: bool = False, post_ns_row_norm: bool = False, normuon_beta2: float = 0.0,
                 compile: bool = False, bf16: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, coeffs=coeffs, row_norm=row_norm,
                                      post_ns_row_norm=post_ns_row_norm, normuon_beta2=normuon_beta2, bf16=bf16))
        # Compiled: one graph per matrix shape, built in the warm-up steps (the other arguments are constants).
        self.newton_schulz = torch.compile(zeropower_via_newtonschulz5, dynamic=False, fullgraph=True) if compile \
            else zeropower_via_newtonschulz5
        self._reduced: list[tuple[object, Tensor]] | None = None  # (collective handle, gradient shard) per shape group

    def _shape_groups(self):
        """(param group, its matrices of one shape, matrices per rank), in the same order on every rank."""
        world_size = dist.get_world_size() if distributed_now() else 1
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[Tensor]] = {}
            for p in group["params"]:
                by_shape.setdefault(p.shape, []).append(p)
            for ps in by_shape.values():
                yield group, ps, -(-len(ps) // world_size)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Launch the reduction of each shape group's gradients (asynchronous over several ranks). A matrix without a
        gradient counts as a zero gradient. On one rank the "shard" is the whole group, stacked."""
        distributed = distributed_now()
        world_size = dist.get_world_size() if distributed else 1
        self._reduced = []
        for _, ps, per_rank in self._shape_groups():
            grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in ps])
            if not distributed:
                self._reduced.append((None, grads))
                continue
            full = grads.new_zeros(world_size * per_rank, *ps[0].shape)  # padded to whole chunks: zeros stay zeros
            full[: len(ps)] = grads / world_size  # a sum of means: gloo has no ReduceOp.AVG
            shard = grads.new_empty(per_rank, *ps[0].shape)
            self._reduced.append((dist.reduce_scatter_tensor(shard, full, async_op=True), shard))

    def reduced_grads(self) -> list[Tensor]:
        """This rank's shards of the mean matrix gradients, one per shape group, once reduced (reduce_grads() first).
        step() reads them as they are then: scaling them in place (clipping) scales the step's gradients."""
        for handle, _ in self._reduced:
            if handle is not None:
                handle.wait()
        # Waited once only: gloo's wait() copies the result into the shard again, which would undo a clip.
        self._reduced = [(None, shard) for _, shard in self._reduced]
        return [shard for _, shard in self._reduced]

    def _direction(self, p: Tensor, g: Tensor, group: dict) -> Tensor:
        """The orthogonalized g (one matrix or a stack) after the optional post-NS normalizations, scaled for its
        shape; NorMuon's state lives with p."""
        if group["post_ns_row_norm"]:  # #1520's "NorMuon": stateless, every row to unit norm
            g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-8).to(g.dtype)
        if group["normuon_beta2"] > 0:  # modded-nanogpt's NorMuon: per-neuron second moment along the longer side
            v = g.float().square().mean(-1 if g.size(-2) >= g.size(-1) else -2, keepdim=True)
            v_ema = self.state[p].setdefault("second_moment", torch.zeros_like(v))
            v_ema.lerp_(v, 1 - group["normuon_beta2"])
            g = rescale_rows_keeping_norm(g, v_ema)
        return g * max(1, g.size(-2) / g.size(-1)) ** 0.5

    @torch.no_grad()
    def step(self, closure=None):
        if self._reduced is None:
            self.reduce_grads()
        shards, self._reduced = self.reduced_grads(), None
        distributed, gathers = distributed_now(), []
        for (group, ps, per_rank), g in zip(self._shape_groups(), shards):
            if group["bf16"]:  # after the clip, which saw the fp32 gradients
                g = g.bfloat16()
            # This rank's chunk of the group keeps its stacked momentum (and NorMuon) state with the group's first matrix.
            buf = self.state[ps[0]].setdefault("momentum_buffer", torch.zeros_like(g))
            if buf.dtype != g.dtype:  # load_state_dict (warm-up's restore, a resume) casts state to the fp32 params
                buf = self.state[ps[0]]["momentum_buffer"] = buf.to(g.dtype)  # exact: it held bf16 values
            buf.mul_(group["momentum"]).add_(g)
            G = g.add(buf, alpha=group["momentum"])
            if group["row_norm"]:  # MuonEq-R: equalize row norms (taken in fp32) before orthogonalizing
                G = G / G.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(G.dtype)
            O = self.newton_schulz(G, group["backend_steps"], 1e-7, group["coeffs"])
            update = self._direction(ps[0], O, group).to(torch.bfloat16 if g.is_cuda else torch.float32)
            if not distributed:
                gathers.append((None, update, ps, group))
                continue
            full = update.new_empty(dist.get_world_size() * per_rank, *update.shape[1:])
            # contiguous(): a tall matrix's update is a transposed view; NCCL refuses non-contiguous tensors.
            gathers.append((dist.all_gather_into_tensor(full, update.contiguous(), async_op=True), full, ps, group))
        for handle, full, ps, group in gathers:
            if handle is not None:
                handle.wait()
            for p, u in zip(ps, full):
                # [ngpt]
                if hasattr(p, "_geodesic_dim"):
                    geodesic_step_(p, u, group["lr"])
                    continue
                # [/ngpt]
                p.add_(u.to(p.dtype), alpha=-group["lr"])


@torch.no_grad()
def clip_grad_norm_global(grads: list[Tensor], shards: list[Tensor], max_norm: float,
                          ordered: list[Tensor] | None = None) -> Tensor:
    """clip_grad_norm_ over gradients spread across ranks: `grads` are the same on every rank (DDP's means), `shards`
    are this rank's disjoint parts of the rest (Muon's reduced matrix gradients). All are scaled in place by
    min(1, max_norm / (norm + 1e-6)) with the norm of all of them together; returns that norm (no host sync).
    On one rank, `ordered` (all of them again, in a model's clip_order) gives the norm as clip_grad_norm_ sums it."""
    device = (grads or shards)[0].device

    def square_sum(ts):
        return sum((torch.linalg.vector_norm(t, dtype=torch.float32).square() for t in ts), torch.zeros((), device=device))

    if ordered is not None:
        norm = torch.nn.utils.get_total_norm(ordered)
    else:
        total = square_sum(shards)
        if distributed_now():
            dist.all_reduce(total)
        norm = (total + square_sum(grads)).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for t in grads + shards:
        t.mul_(scale.to(t.dtype))
    return norm


def average_across_ranks(grads: list[Tensor]) -> None:
    """Each gradient replaced by its mean over the ranks, one all-reduce per dtype (gloo has no ReduceOp.AVG)."""
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.flatten() for g in same]) / dist.get_world_size()
        dist.all_reduce(flat)
        for g, mean in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(mean.view_as(g))


def step_optimizers(optimizers: list[torch.optim.Optimizer], muon: Muon, grad_clip_norm: float,
                    clip_order: Callable[[], list[Tensor]] | None = None, per_rank: bool = False) -> Tensor | None:
    """Every optimizer's step. Muon's gradient reductions are launched first, so they travel while the clipping norm
    and Adam's steps compute. The clip, if on, sees the global norm (all parameters, every rank's data; on one rank
    summed in the model's clip_order if it has one), which is returned (None without clipping). per_rank (with the
    clip on; GRAD_CLIP_SCOPE=rank, #1855/#2014): each rank clips its own gradients by their norm (returned), then
    they are averaged, the non-matrix ones here (DDP left them alone)."""
    others = [p.grad for opt in optimizers if opt is not muon for g in opt.param_groups for p in g["params"]
              if p.grad is not None]
    norm = None
    if per_rank:
        mine = [p.grad for g in muon.param_groups for p in g["params"] if p.grad is not None] + others
        norm = clip_grad_norm_global(mine, [], grad_clip_norm, clip_order() if clip_order else mine)
        if distributed_now():
            average_across_ranks(others)
    muon.reduce_grads()
    if grad_clip_norm > 0 and not per_rank:
        ordered = clip_order() if clip_order is not None and not distributed_now() else None
        norm = clip_grad_norm_global(others, muon.reduced_grads(), grad_clip_norm, ordered)
    for opt in optimizers:
        if opt is not muon:
            opt.step()
    muon.step()
    return norm


def ddp_without_matrices(model: nn.Module, base_model: nn.Module, device: torch.device) -> DDP:
    # DDP all-reduces every gradient but the Muon matrices', which Muon reduce-scatters itself (Muon.reduce_grads).
    matrices = {id(p) for p in base_model.param_groups()["matrix"]}
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if id(p) in matrices])
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def add_weight_decay(opt: torch.optim.Optimizer, wd: float, cautious: bool) -> None:
    """Decoupled weight decay p -= lr * wd * p (on the pre-step weights), for any optimizer, through step hooks.
    Cautious (Chen et al. 2024 via modded-nanogpt): only where the step itself moves the weight toward zero."""
    if wd <= 0:
        return
    before: list[Tensor] = []

    def snapshot(*_):
        before[:] = [p.detach().clone() for g in opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def decay(*_):
        olds = iter(before)
        for g in opt.param_groups:
            for p in g["params"]:
                old = next(olds)
                keep = ((old - p) * old >= 0) if cautious else 1.0
                p.sub_(g["lr"] * wd * old * keep)

    opt.register_step_pre_hook(snapshot)
    opt.register_step_post_hook(decay)


def build_optimizers(args: Hyperparameters, model: nn.Module) -> tuple[list[torch.optim.Optimizer], Muon]:
    groups, lrs, wds = model.param_groups(), model.learning_rates(args), model.weight_decays(args)
    fused = next(model.parameters()).is_cuda

    def adam(name):
        # Plain decay inside AdamW's step: a bf16 weight (the embedding on GPU) is rounded once per step, not twice.
        opt = torch.optim.AdamW([{"params": groups[name], "lr": lrs[name], "base_lr": lrs[name]}],
                                betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused,
                                weight_decay=0.0 if args.cautious_wd else wds[name])
        if args.cautious_wd:  # the mask needs the step's direction: decay through the hooks
            add_weight_decay(opt, wds[name], cautious=True)
        return opt

    muon = Muon(groups["matrix"], lr=lrs["matrix"], momentum=args.muon_momentum, backend_steps=args.muon_backend_steps,
                coeffs=args.muon_ns_coeffs, row_norm=args.muon_row_norm, post_ns_row_norm=args.muon_post_ns_row_norm,
                normuon_beta2=args.normuon_beta2, compile=args.compile, bf16=args.muon_bf16)
    add_weight_decay(muon, wds["matrix"], args.cautious_wd)
    for g in muon.param_groups:
        g["base_lr"] = lrs["matrix"]
    optimizers = [adam("embed"), muon, adam("scalar")]
    if groups["head"]:
        optimizers.insert(1, adam("head"))
    return optimizers, muon


def train_budget_ms(args: Hyperparameters) -> float | None:
    # The wallclock cap less the GPTQ calibration reserve: calibration reads training data, so it must fit in the cap.
    if args.max_wallclock_seconds <= 0:
        return None
    return 1000.0 * (args.max_wallclock_seconds - (args.gptq_reserve_seconds if args.gptq else 0.0))


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    # Linear warmdown over the last WARMDOWN_ITERS steps, or the last WARMDOWN_FRAC of the run, down to MIN_LR_FRAC,
    # never below MIN_LR (the 1.0611 record's floor). Under a wallclock cap the run is measured in time:
    # WARMDOWN_ITERS is projected from the average step time so far, so the decay ends when time does.
    total_ms = train_budget_ms(args)
    if total_ms is None:
        warmdown = args.warmdown_frac * args.iterations if args.warmdown_frac > 0 else args.warmdown_iters
        left = args.iterations - step
    else:
        warmdown = args.warmdown_frac * total_ms if args.warmdown_frac > 0 else args.warmdown_iters * elapsed_ms / max(step, 1)
        left = max(total_ms - elapsed_ms, 0.0)
    frac = min(left / warmdown, 1.0) if warmdown > 0 else 1.0
    return max(args.min_lr_frac + (1 - args.min_lr_frac) * frac, args.min_lr)


def seq_stages(schedule: str, train_seq_len: int) -> list[tuple[int, float]]:
    """TRAIN_SEQ_SCHEDULE "len@frac,..." as [(length, fraction of training up to which it runs)]; empty: one stage."""
    if not schedule:
        return [(train_seq_len, 1.0)]
    try:
        stages = [(int(n), float(f)) for n, f in (stage.split("@") for stage in schedule.split(","))]
    except ValueError:
        stages = []
    fracs = [f for _, f in stages]
    if not stages or fracs != sorted(set(fracs)) or fracs[0] <= 0 or fracs[-1] != 1 or stages[-1][0] != train_seq_len \
            or min(n for n, _ in stages) < 1:
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE={schedule!r}: give len@frac stages, fractions rising to 1.0, the last "
                          f"length TRAIN_SEQ_LEN={train_seq_len} (e.g. 1024@0.1,2048@0.7,{train_seq_len}@1.0), or empty")
    return stages


def stage_seq_len(args: Hyperparameters, frac: float) -> int:
    # #2014's rule: the first stage whose fraction training has not passed.
    return next((n for n, f in args.seq_stages if frac <= f), args.seq_stages[-1][0])


def muon_momentum(args: Hyperparameters, step: int) -> float:
    # Warmed up linearly from MUON_MOMENTUM_WARMUP_START over MUON_MOMENTUM_WARMUP_STEPS steps.
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


class WeightEMA:
    """fp32 exponential moving average of a model's float weights, updated after every step, copied in at the end.
    With warmup the decay is min(decay, (1 + n) / (10 + n)) after n updates, so a short run averages its last steps
    instead of keeping its random init; past a few thousand steps it is the plain EMA (the record's, from step 1)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.weights = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.average = [t.detach().float().clone() for t in self.weights]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, self.updates / (self.updates + 9)) if self.warmup else self.decay
        torch._foreach_lerp_(self.average, [t.float() for t in self.weights], 1 - decay)

    @torch.no_grad()
    def apply(self) -> None:
        for t, a in zip(self.weights, self.average):
            t.copy_(a)


# [swa]
class WeightSWA:
    """Stochastic weight averaging (#1090): an fp32 sum of the float weights, added every SWA_EVERY steps of the
    warmdown; their mean replaces the weights at the end."""

    def __init__(self, model: nn.Module):
        self.weights = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.total, self.count = [torch.zeros_like(t, dtype=torch.float32) for t in self.weights], 0

    @torch.no_grad()
    def add(self) -> None:
        torch._foreach_add_(self.total, [t.float() for t in self.weights])
        self.count += 1

    @torch.no_grad()
    def apply(self) -> None:
        for t, total in zip(self.weights, self.total):
            t.copy_(total / self.count)


def swa_start(args: Hyperparameters, clock) -> float:
    """The step the warmdown starts at, as #1090 reckons it: under a time budget, of the steps the pace so far
    projects (whole steps)."""
    total = args.iterations if clock.budget_ms is None else int(clock.budget_ms * clock.step / clock.ms)
    return total - (args.warmdown_frac * total if args.warmdown_frac > 0 else args.warmdown_iters)
# [/swa]


# -----------------------------
# QUANTIZATION AND EXPORT
# -----------------------------
# Matrices become per-row integer codes (in int8 containers, which entropy-code better than bit-packed ones)
# with fp16 row scales; each tensor class has its own precision; vectors, control and tiny tensors stay float,
# but for the attention gate (QUANT_GATE=int8: per row at |w|max, the 1.0611 record's gate quantization).
# Steps: SDClip scales -> GPTQ on Hessians from training batches -> optional low-rank correction -> pack ->
# smallest of the compressors -> if over the cap, zero the smallest weights until it fits.
# Artifact = SEAL_MAGIC + CRC-32 of the rest + inner container, checked before anything decompresses it; inner
# container = MAGIC + compressor name + compressed(payload); payload = 4-byte manifest length + JSON manifest
# (format version, settings, tensor table, byte shuffle) + raw tensor bytes. It loads with the requirements alone.
# EXPORT_FORMAT=starter (BASELINE=1) is the challenge starter's export instead, byte for byte: float tensors of at
# most 65,536 values kept (fp16; control tensors fp32), larger matrices int8 per row, clipped at the 99.99984th
# percentile of |w| with a grid step of at least 1/127, in its dict layout, torch.save, zlib level 9; no settings.

ARTIFACT_MAGIC = b"PGOLF1"
ARTIFACT_VERSION = 2
QUANT_BITS = {"int5": 5, "int6": 6, "int7": 7, "int8": 8, "fp16": 16}
STARTER_KEEP_FLOAT_MAX_NUMEL = 65_536
GATE_INT8_NUMEL = (32, 8192)  # QUANT_GATE=int8 rounds gates of this many values only, as the records
STARTER_CLIP_Q = 99.99984 / 100
STARTER_QUANT_FORMAT = "int8_clean_per_row_v1"
STARTER_MAGIC = b"\x78\xda"  # the starter's container has no header: this is how a level-9 zlib stream starts
SEAL_MAGIC = b"PGSUM1"  # the outer container; the starter's has none: zlib's own Adler-32 is its checksum


def _zstd():
    import zstandard

    return zstandard


def _brotli():
    import brotli  # a requirement; available_compressors() leaves it out where it is missing

    return brotli


def _zpaq():
    import zpaq  # a requirement, like brotli

    return zpaq


COMPRESSORS = {
    "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "zstd": (lambda b: _zstd().ZstdCompressor(level=22).compress(b), lambda b: _zstd().ZstdDecompressor().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "brotli": (lambda b: _brotli().compress(b, quality=11, lgwin=24), lambda b: _brotli().decompress(b)),
    # ZPAQ's strongest method (context mixing): within 0.2% of the codes' entropy, 0.83% under brotli on a full-size
    # artifact, but slow; in up to 4 blocks of 4 MB or more (3.7 KB more than 1 there), compressed and decompressed
    # in parallel.
    "zpaq": (lambda b: _zpaq().compress(b, level=5, threads=min(4, 1 + len(b) // 2**22)), lambda b: _zpaq().decompress(b)),
    # The default: the same ZPAQ in one block per 4 MB of payload laid out by tensor group (pack_artifact), so the
    # blocks compress and decompress in parallel threads, each on one kind of tensor (docs/compressor.md).
    "zpaqg": (lambda b: _zpaq().compress(b, level=5, threads=max(1, len(b) // 2**22)), lambda b: _zpaq().decompress(b)),
}
BEST_COMPRESSORS = ("zlib", "zstd", "lzma", "brotli")  # COMPRESSOR=best: the fast ones


# Parameter kind -> the precision setting it follows (quant_plan's class): the token embedding and the head are
# QUANT_EMBED's, the other tables QUANT_MLP's; control tensors and vectors stay float.
QUANT_CLASS = {"embed": "embed", "head": "embed", "table": "mlp", "gate": "gate", "attn": "attn", "mlp": "mlp"}


def tensor_class(name: str, t: Tensor, float_max: int) -> str | None:
    """The precision setting a tensor follows: 'gate' (attention-gate matrices of GATE_INT8_NUMEL values), 'embed',
    'attn', 'mlp'; None for tensors kept float (control tensors, vectors, integers, other gates, and matrices of at
    most float_max = QUANT_FLOAT_MAX values, as the records keep them)."""
    kind = param_kind(name, t)
    if not t.is_floating_point() or kind not in QUANT_CLASS:
        return None
    if kind == "gate":
        return "gate" if GATE_INT8_NUMEL[0] <= t.numel() <= GATE_INT8_NUMEL[1] else None
    return None if t.numel() <= float_max else QUANT_CLASS[kind]


def stored_fp32(name: str, t: Tensor) -> bool:
    # Control tensors kept float are stored in fp32 (QUANT_CONTROL=fp32, the starter's), other floats in fp16.
    return param_kind(name, t) in ("gate", "control")


# Tensor class -> the settings (attribute names) of its precision and SDClip k; None: k = 0, no clipping.
QUANT_SETTINGS = {"attn": ("quant_attn", "sdclip_k_attn"), "mlp": ("quant_mlp", "sdclip_k_mlp"),
                  "embed": ("quant_embed", "sdclip_k_embed"), "gate": ("quant_gate", None)}


def quant_plan(args: Hyperparameters) -> dict[str, tuple[int, float]]:
    """Tensor class -> (bits, SDClip k). A float gate (32 bits) stays as the control tensor it is."""
    return {cls: (QUANT_BITS.get(getattr(args, bits), 32), getattr(args, k) if k else 0.0)
            for cls, (bits, k) in QUANT_SETTINGS.items()}


def sdclip_scales(w: Tensor, qmax: int, k: float) -> Tensor:
    # SDClip: clip each row at k standard deviations, so the grid step (and with it the entropy of the codes) follows
    # the row's spread, not its outliers; rounded to the fp16 that is stored, so both sides use one grid. k = 0: the
    # row's largest |w| is the grid's end, nothing is clipped.
    spread = k * w.float().std(dim=1) if k else w.float().abs().amax(dim=1)
    return (spread / qmax).clamp_min(1e-7).half().float()


# [qat]
def fake_quantize(w: Tensor, qmax: int, k: float) -> Tensor:
    """w rounded to nearest on its export grid: the QAT forward."""
    s = sdclip_scales(w, qmax, k)[:, None]
    return (w.float() / s).round().clamp(-qmax, qmax).mul(s).to(w.dtype)


def set_qat(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.qat_on.fill_(float(on))


def configure_qat(model: nn.Module, args: Hyperparameters) -> None:
    # Give every quantized CastedLinear its class's grid (before compiling: qmax and k are constants of the graph).
    plan = quant_plan(args)
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear):
            cls = tensor_class(f"{name}.weight", m.weight, args.quant_float_max)
            if cls is not None and plan[cls][0] < 16:
                m.qat = partial(fake_quantize, qmax=2 ** (plan[cls][0] - 1) - 1, k=plan[cls][1])
# [/qat]


def collect_hessians(base_model: nn.Module, batches) -> dict[str, Tensor]:
    """GPTQ's Hessians: sum of X^T X over the inputs X of every F.linear that multiplies a 2-D parameter (the
    tied embedding used as the output head included), on a float32 copy without QAT so that weight.to(x.dtype)
    is the parameter itself; and under "<name>:rows" the number of rows of X (AWQ-lite's activation RMS)."""
    model = copy.deepcopy(base_model).float()
    if hasattr(model, "calibration_copy"):  # [ngpt]
        model.calibration_copy()  # [ngpt]
    if model.attention_kernel in PACKED_KERNELS:  # varlen_attn has no fp32 kernel: the dense document mask instead
        model.attention_kernel = "sdpa_masked"
    for m in model.modules():  # [qat]
        if isinstance(m, CastedLinear):  # [qat]
            m.qat = None  # [qat]
    names = {id(p): n for n, p in model.named_parameters() if p.ndim == 2}
    hessians: dict[str, Tensor] = {}

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear and len(args) > 1 and id(args[1]) in names:
                x = args[0].detach().reshape(-1, args[0].size(-1)).float()
                h = hessians.setdefault(names[id(args[1])], x.new_zeros(x.size(1), x.size(1)))
                h.addmm_(x.T, x)
                rows = hessians.setdefault(f"{names[id(args[1])]}:rows", x.new_zeros((), dtype=torch.float64))
                rows += x.size(0)
            return func(*args, **(kwargs or {}))

    # fp32 attention: flash has no fp32 kernel, so the others are allowed here whatever SDP_BACKENDS says.
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.no_grad(), Capture(), sdpa_kernel(kernels):
        for x, y in batches:
            model(x, y)
    return hessians


def gptq(w: Tensor, scale: Tensor, qmax: Tensor | int, H: Tensor, damp: float, block: int, fp64: bool = True,
         damp_sorted: bool = False) -> Tensor:
    """GPTQ (Frantar et al. 2022): quantize columns in order of decreasing Hessian diagonal (act-order), each
    column's rounding error pushed onto the columns not yet quantized, block by block. Returns the codes. The
    Hessian is inverted in float64 (fp64=False: float32, as the 1.0611 record; about 1 code in 1,300 differs).
    scale: per row, or per row and column with qmax per column (AWQ-lite's grid on its columns)."""
    W, H = w.float().clone(), H.to(torch.float64 if fp64 else torch.float32).clone()
    dead = H.diagonal() == 0  # inputs that never fired: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if not damp_sorted:
        H.diagonal().add_(damp * H.diag().mean())  # mean of a contiguous copy: the record's summation order
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    if damp_sorted:  # [quant_search]
        H.diagonal().add_(damp * H.diag().mean())  # [quant_search]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    S = (scale if scale.ndim == 2 else scale[:, None].expand_as(W))[:, perm]
    qmax = torch.as_tensor(qmax).expand(W.size(1))[perm]
    Q = torch.empty_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1, E1, Hb = W[:, i1:i2].clone(), torch.empty_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            s = S[:, i1 + j : i1 + j + 1]
            q = (W1[:, j : j + 1] / s).round().clamp(-qmax[i1 + j], qmax[i1 + j])
            Q[:, i1 + j] = q[:, 0]
            E1[:, j : j + 1] = err = (W1[:, j : j + 1] - q * s) / Hb[j, j]
            W1[:, j:] -= err * Hb[j : j + 1, j:]
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


# [quant_search]
CLIP_SEARCH_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


def clip_search_scales(w: Tensor, qmax: int, fp16: bool) -> Tensor:
    """#1108's clip: per row the |w| quantile (1.0: the max; the grid step at least 1/qmax, as the starter's) of
    least squared rounding error summed over the whole matrix, first on ties; fp16: searched on the stored fp16 grid
    (its round to nearest), else on float32 (its GPTQ, which stores the scale rounded to fp16 all the same)."""
    w, best = w.float(), (float("inf"), None)
    for p in CLIP_SEARCH_QUANTILES:
        s = ((w.abs().quantile(p, dim=1) if p < 1 else w.abs().amax(dim=1)) / qmax).clamp_min(1.0 / qmax)
        s = s.half().float() if fp16 else s
        err = (w - (w / s[:, None]).round().clamp(-qmax, qmax) * s[:, None]).pow(2).mean().item()
        best = (err, s) if err < best[0] else best
    return best[1]


def per_tensor_int8(t: Tensor) -> dict[str, Tensor]:
    """#1108's embeddings: int8 on one grid of |w|max / 127 (rounded from the double to the stored fp16), the scale
    repeated per row (the artifact's layout; it compresses to nothing)."""
    w = t.detach().float()
    amax = w.abs().max().item()
    s = torch.tensor(amax / 127 if amax > 0 else 1.0, dtype=torch.float16)
    q = (w / s.float()).round().clamp(-127, 127)
    return {"q": q.to(torch.int8).cpu().contiguous(), "scale": s.expand(t.size(0)).contiguous()}


def prune_ones(qsd: dict[str, dict], frac: float, seed: int) -> None:
    """#1108's random prune, in place: frac of all codes zeroed, each +-1 code with probability frac x codes / +-1
    codes, drawn tensor by tensor (those with a +-1 code) in the state dict's order from one generator seeded with
    seed (#1108: torch's global one after torch.manual_seed(42), the same stream); too few +-1 codes: every |code| <= 1."""
    codes = [e["q"] for e in qsd.values() if "q" in e]
    target = int(frac * sum(q.numel() for q in codes))
    ones = sum(int((q.abs() == 1).sum()) for q in codes)
    g = torch.Generator().manual_seed(seed)
    for q in codes if target > 0 else ():
        mask = q.abs() == 1 if target <= ones else q.abs() <= 1
        if target <= ones and mask.any():
            mask &= torch.rand(q.shape, generator=g) < target / ones
        q[mask] = 0
# [/quant_search]


def gptq_hessian(name: str, cls: str | None, args: Hyperparameters, hessians: dict | None) -> Tensor | None:
    return (hessians or {}).get(name) if cls in ("attn", "mlp") or cls == "embed" and args.gptq_embed else None


def awq_groups(state_dict: dict[str, Tensor], args: Hyperparameters, hessians: dict | None) -> dict[str, list[int]]:
    """AWQ-lite (#2014's): over every GPTQ matrix coarser than int<AWQ_BITS>, the AWQ_GROUPS groups of AWQ_GROUP_SIZE
    input columns of most salience (activation RMS, sqrt(diag H / rows), times mean |w|, summed) -> their starts."""
    plan, g, cands = quant_plan(args), args.awq_group_size, []
    for name, t in state_dict.items():
        cls = tensor_class(name, t, args.quant_float_max)
        H, rows = gptq_hessian(name, cls, args, hessians), (hessians or {}).get(f"{name}:rows")
        if H is not None and rows is not None and plan[cls][0] < args.awq_bits:
            salience = (H.diagonal().float() / rows.float()).sqrt().cpu() * t.detach().float().cpu().abs().mean(0)
            cands += [(float(salience[c : c + g].sum()), name, c) for c in range(0, t.size(1) - g + 1, g)]
    chosen: dict[str, list[int]] = {}
    for _, name, c in sorted(cands, key=lambda x: -x[0])[: args.awq_groups]:
        chosen.setdefault(name, []).append(c)
    return chosen


def quantize_state_dict(state_dict: dict[str, Tensor], args: Hyperparameters, hessians: dict[str, Tensor] | None = None) -> dict[str, dict]:
    """Quantized matrices -> {"q": int8 codes, "scale": fp16 per row (+ "lr_a", "lr_b": fp16 low-rank correction;
    + "awq_start", "awq_size", "awq_scale": AWQ-lite's column groups and their fp16 row scales)}; float tensors ->
    {"w"}: fp32 for control tensors, fp16 otherwise. GPTQ where a Hessian is given."""
    if args.export_format == "starter":  # round to nearest, as the starter: Hessians (GPTQ=1) go unused
        return quantize_starter_int8(state_dict)
    plan, out, errors = quant_plan(args), {}, {}
    awq = awq_groups(state_dict, args, hessians) if args.awq_groups else {}
    for name, t in state_dict.items():
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        cls = tensor_class(name, t, args.quant_float_max)
        if cls is None or plan[cls][0] >= 16:
            control = stored_fp32(name, t) and args.quant_control == "fp32"
            keep = torch.float32 if control else torch.float16
            out[name] = {"w": (t.to(keep) if t.is_floating_point() else t).cpu().contiguous(), "dtype": dtype}
            continue
        if args.quant_embed_per_tensor and param_kind(name, t) in ("embed", "table", "head"):  # [quant_search]
            out[name] = {**per_tensor_int8(t), "dtype": dtype}  # [quant_search]
            continue  # [quant_search]
        bits, k = plan[cls]
        qmax = 2 ** (bits - 1) - 1
        scale = grid = sdclip_scales(t, qmax, k)
        H, extra = gptq_hessian(name, cls, args, hessians), {}
        if args.quant_clip_search:  # [quant_search]
            grid = clip_search_scales(t, qmax, fp16=H is None)  # [quant_search]
            scale = grid.half().float()  # [quant_search]
        if name in awq:  # its columns on the finer grid of the same clip
            cols = torch.zeros(t.size(1), dtype=torch.bool, device=t.device)
            for c in awq[name]:
                cols[c : c + args.awq_group_size] = True
            fine_qmax = 2 ** (args.awq_bits - 1) - 1
            fine = sdclip_scales(t, fine_qmax, k)
            grid, qmax = torch.where(cols, fine[:, None], scale[:, None]), torch.where(cols, fine_qmax, qmax)
            extra = {"awq_start": torch.tensor(awq[name], dtype=torch.int16),
                     "awq_size": torch.tensor(args.awq_group_size, dtype=torch.int16), "awq_scale": fine.half().cpu()}
        q = gptq(t, grid, qmax, H.to(t.device), args.gptq_damp, args.gptq_block, args.gptq_fp64,
                 args.gptq_damp_sorted) if H is not None \
            else (t.float() / scale[:, None]).round().clamp(-qmax, qmax)
        out[name] = {"q": q.to(torch.int8).cpu().contiguous(), "scale": scale.half().cpu(), **extra, "dtype": dtype}
        if args.lowrank_rank and cls != "gate":
            errors[name] = t.float().cpu() - dequantize_codes(out[name])
    # Low-rank correction (LQER): the top singular directions of the largest quantization errors.
    for name in sorted(errors, key=lambda n: -errors[n].norm().item())[: args.lowrank_tensors]:
        U, S, Vh = torch.linalg.svd(errors[name], full_matrices=False)
        r = args.lowrank_rank
        out[name].update(pack_lowrank(U[:, :r] * S[:r], Vh[:r], args.lowrank_group))
    if args.quant_prune_ones:  # [quant_search]
        prune_ones(out, args.quant_prune_ones, args.quant_prune_seed)  # [quant_search]
    return out


def absmax_codes(x: Tensor, half_steps: float, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Each row of x on a grid of |row|max / half_steps (an fp16 scale per row), codes clamped to [lo, hi]."""
    s = (x.abs().amax(dim=1, keepdim=True) / half_steps).clamp_min(1e-7).half()
    return (x / s.float()).round().clamp(lo, hi).to(torch.int8).contiguous(), s


def pack_lowrank(a: Tensor, b: Tensor, group: int) -> dict[str, Tensor]:
    """The correction a @ b: fp16 factors, or with LOWRANK_GROUP=g (when g divides b's size) the 1.0611 record's
    asymmetric packing: a in int2 [-2, 1] with one scale, b in int4 [-8, 7] with a scale per g values in a row."""
    if not group or b.numel() % group:
        return {"lr_a": a.half().contiguous(), "lr_b": b.half().contiguous()}
    qa, sa = absmax_codes(a.reshape(1, -1), 1.5, -2, 1)
    qb, sb = absmax_codes(b.reshape(-1, group), 7.5, -8, 7)
    return {"lr_a": qa.view_as(a), "lr_sa": sa, "lr_b": qb.view_as(b), "lr_sb": sb}


def lowrank_term(e: dict) -> Tensor:
    a, b = e["lr_a"].float(), e["lr_b"].float()
    if "lr_sa" in e:  # int2/int4 codes: one scale for a, one per group of b's values
        a = a * e["lr_sa"].float()
        b = (b.reshape(e["lr_sb"].size(0), -1) * e["lr_sb"].float()).view_as(b)
    return a @ b


# [starter]
def quantize_starter_int8(state_dict: dict[str, Tensor]) -> dict[str, dict]:
    """The starter's int8 (EXPORT_FORMAT=starter), in quantize_state_dict's layout."""
    out = {}
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if not t.is_floating_point():
            out[name] = {"w": t, "dtype": dtype}
        elif t.numel() <= STARTER_KEEP_FLOAT_MAX_NUMEL:
            if stored_fp32(name, t):  # kept and restored as fp32
                out[name] = {"w": t.float(), "dtype": "float32"}
            else:
                out[name] = {"w": t.half() if t.dtype in (torch.float32, torch.bfloat16) else t, "dtype": dtype}
        elif t.ndim == 2:
            w = t.float()
            clip = torch.quantile(w.abs(), STARTER_CLIP_Q, dim=1)[:, None]
            scale = (clip / 127).clamp_min(1 / 127)
            q = (w.clamp(-clip, clip) / scale).round().clamp(-127, 127)
            out[name] = {"q": q.to(torch.int8), "scale": scale[:, 0].half(), "dtype": dtype}
        else:
            raise ConfigError(f"EXPORT_FORMAT=starter: {name} is a {t.ndim}-D float tensor of over 65,536 values, which "
                              "the starter quantizes per tensor and this script does not; use EXPORT_FORMAT=pgolf")
    return out
# [/starter]


def dequantize_codes(e: dict) -> Tensor:
    w = e["q"].float() * e["scale"].float()[:, None]
    for c in e["awq_start"].tolist() if "awq_start" in e else ():
        cols = slice(c, c + int(e["awq_size"]))
        w[:, cols] = e["q"][:, cols].float() * e["awq_scale"].float()[:, None]
    return w


def dequantize_state_dict(qsd: dict[str, dict]) -> dict[str, Tensor]:
    out = {}
    for name, e in qsd.items():
        dtype = getattr(torch, e["dtype"])
        if "q" in e:
            w = dequantize_codes(e)
            out[name] = (w + lowrank_term(e) if "lr_a" in e else w).to(dtype)
        else:
            out[name] = e["w"].to(dtype)
    return out


def pack_artifact(qsd: dict[str, dict], settings: dict, compressor: str, shuffle: bool = True,
                  export_format: str = "pgolf") -> bytes:
    """Serialize and compress; COMPRESSOR=best compresses with every available compressor (in parallel threads)
    and keeps the smallest. Codes are laid out first, then multi-byte tensors, byte-shuffled if asked (all first
    bytes, then all second bytes, ...), which compresses fp16 better. EXPORT_FORMAT=starter: the starter's container."""
    if export_format == "starter":
        return pack_starter(qsd)
    # zpaqg: each tensor group (same part and name but for the layer) in a run, so its blocks are each of one kind
    group = (lambda n, p: (p, re.sub(r"^blocks\.\d+\.", "", n))) if compressor == "zpaqg" else (lambda n, p: ())
    parts = sorted(((n, p, t) for n, e in qsd.items() for p, t in e.items() if p != "dtype"),
                   key=lambda x: (x[2].element_size(), *group(x[0], x[1])))
    table, chunks, offset = [], [], 0
    for name, part, t in parts:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        raw = (raw.reshape(-1, t.element_size()).T if shuffle else raw).tobytes()
        table.append([name, part, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(raw)])
        chunks.append(raw)
        offset += len(raw)
    manifest = json.dumps({"version": ARTIFACT_VERSION, "settings": settings, "tensors": table, "shuffle": shuffle,
                           "dtypes": {n: e["dtype"] for n, e in qsd.items()}}, separators=(",", ":")).encode()
    payload = len(manifest).to_bytes(4, "little") + manifest + b"".join(chunks)
    names = [c for c in available_compressors() if c in BEST_COMPRESSORS] if compressor == "best" else [compressor]
    with ThreadPoolExecutor(len(names)) as pool:
        blobs = pool.map(lambda c: ARTIFACT_MAGIC + bytes([len(c)]) + c.encode() + COMPRESSORS[c][0](payload), names)
        return min(blobs, key=len)


# [starter]
def pack_starter(qsd: dict[str, dict]) -> bytes:
    """The starter's container: its dict layout (the same keys, in the same order, so torch.save writes the same
    bytes), zlib level 9."""
    obj = {"__quant_format__": STARTER_QUANT_FORMAT, "quantized": {}, "scales": {}, "dtypes": {}, "passthrough": {}}
    qmeta, orig_dtypes = {}, {}
    for name, e in qsd.items():
        if "q" in e:
            obj["quantized"][name], obj["scales"][name], obj["dtypes"][name] = e["q"], e["scale"], e["dtype"]
            qmeta[name] = {"scheme": "per_row", "axis": 0}
        else:
            obj["passthrough"][name] = e["w"]
            if e["w"].dtype != getattr(torch, e["dtype"]):
                orig_dtypes[name] = e["dtype"]
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), 9)
# [/starter]


def seal_artifact(inner: bytes) -> bytes:
    return SEAL_MAGIC + zlib.crc32(inner).to_bytes(4, "little") + inner


def unseal_artifact(blob: bytes, source: str = "artifact") -> bytes:
    """The inner container, its checksum verified; an artifact without a seal (the starter's, or one written before
    seals) passes through unchanged."""
    if not blob.startswith(SEAL_MAGIC):
        return blob
    n = len(SEAL_MAGIC) + 4
    if len(blob) < n or zlib.crc32(memoryview(blob)[n:]) != int.from_bytes(blob[n - 4 : n], "little"):
        raise ConfigError(f"corrupt artifact {source}: checksum mismatch ({len(blob)} bytes); re-export or re-download it")
    return blob[n:]


# [starter]
def unpack_starter(blob: bytes, source: str) -> dict[str, dict]:
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:  # its Adler-32 (or the stream itself) does not check out
        raise ConfigError(f"corrupt artifact {source}: checksum mismatch ({e}); re-export or re-download it") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        starter = isinstance(obj, dict) and obj.get("__quant_format__") == STARTER_QUANT_FORMAT
    except (RuntimeError, pickle.UnpicklingError):
        starter = False
    if not starter:
        raise ConfigError(f"{source}: a zlib stream but not the starter's int8 export ({STARTER_QUANT_FORMAT}); give a "
                          "file written by train_gpt.py or the starter")
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    qsd = {name: {"q": q, "scale": obj["scales"][name], "dtype": obj["dtypes"][name]} for name, q in obj["quantized"].items()}
    for name, w in obj["passthrough"].items():
        qsd[name] = {"w": w, "dtype": orig_dtypes.get(name, str(w.dtype).removeprefix("torch."))}
    return qsd
# [/starter]


def artifact_compressor(blob: bytes, source: str = "artifact") -> str:
    blob = unseal_artifact(blob, source)
    if blob.startswith(STARTER_MAGIC):
        if "starter" in DROPPED_FEATURES:  # SCORE_ARTIFACT given the starter's container: its reader is left out
            raise ConfigError(f"{source}: a starter artifact, which this counted copy of train_gpt.py cannot read (it "
                              "was made for other settings); score it with the readable train_gpt.py")
        return "zlib"
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ConfigError(f"{source}: not a Parameter Golf artifact (bad magic): corrupt, or not written by train_gpt.py; "
                          "re-export or re-download it, or give a file train_gpt.py wrote")
    compressor = blob[len(ARTIFACT_MAGIC) + 1 : len(ARTIFACT_MAGIC) + 1 + blob[len(ARTIFACT_MAGIC)]].decode()
    if compressor not in available_compressors():
        raise ConfigError(f"{source}: compressor {compressor!r} is unknown or not installed here "
                          "(brotli: pip install brotli; zpaq: pip install zpaq); use a train_gpt.py and packages that know it")
    return compressor


def unpack_artifact(blob: bytes, source: str = "artifact") -> tuple[dict[str, dict], dict | None]:
    """Inverse of pack_artifact: (quantized state dict, settings the model was built with; None for the starter's
    container, which carries none)."""
    blob = unseal_artifact(blob, source)
    compressor = artifact_compressor(blob, source)
    # [starter]
    if blob.startswith(STARTER_MAGIC):
        return unpack_starter(blob, source), None
    # [/starter]
    try:  # each decompressor has its own error class; any of them means the same: a damaged file
        payload = COMPRESSORS[compressor][1](blob[len(ARTIFACT_MAGIC) + 1 + len(compressor) :])
        mlen = int.from_bytes(payload[:4], "little")
        manifest = json.loads(payload[4 : 4 + mlen])
    except Exception as e:
        raise ConfigError(f"{source}: its {compressor} payload does not decode ({type(e).__name__}); the file is "
                          "damaged or truncated: copy it again") from None
    if manifest["version"] != ARTIFACT_VERSION:
        raise ConfigError(f"{source}: artifact format version {manifest['version']}, this script reads {ARTIFACT_VERSION}")
    data = memoryview(payload)[4 + mlen :]
    qsd = {name: {"dtype": dtype} for name, dtype in manifest["dtypes"].items()}
    for name, part, dtype, shape, offset, size in manifest["tensors"]:
        raw = np.frombuffer(data[offset : offset + size], dtype=np.uint8)
        raw = raw.reshape(getattr(torch, dtype).itemsize, -1).T.flatten() if manifest["shuffle"] else raw.copy()
        raw = torch.from_numpy(raw) if size else torch.empty(0, dtype=torch.uint8)
        qsd[name][part] = raw.view(getattr(torch, dtype)).reshape(shape)
    return qsd, manifest["settings"]


def prune_to_fit(qsd: dict[str, dict], settings: dict, compressor: str, shuffle: bool, max_bytes: int,
                 export_format: str = "pgolf"):
    """The cap remedy: zero the smallest-magnitude quantized weights (|code| x row scale), fewest first, until the
    artifact has at most max_bytes. Returns (qsd, blob, weights zeroed); the blob may still be over if even
    zeroing every code does not fit. The blob is sealed (SEAL_MAGIC), but for the starter's format."""

    def pack(q):
        blob = pack_artifact(q, settings, compressor, shuffle, export_format)
        return blob if export_format == "starter" else seal_artifact(blob)

    blob = pack(qsd)
    names = [n for n, e in qsd.items() if "q" in e]
    if len(blob) <= max_bytes or not names:
        return qsd, blob, 0
    compressor = artifact_compressor(blob)  # search with the winner only
    mags = torch.cat([(qsd[n]["q"].float().abs() * qsd[n]["scale"].float()[:, None]).flatten() for n in names])
    order = torch.argsort(mags.masked_fill(mags == 0, float("inf")), stable=True)
    nonzero, size0, pruned, out = int((mags > 0).sum()), len(blob), 0, qsd
    while len(blob) > max_bytes and pruned < nonzero:
        # Next count from the bytes saved per zeroed weight so far, 20% past the goal. First guess: two bits (an int6
        # stand-in of #1520 saved 2.4 bits per weight zeroed; one bit zeroed 2.9x the weights needed, docs/stack-1520.md).
        per_weight = (size0 - len(blob)) / pruned if pruned else 0.25
        pruned = min(nonzero, pruned + int(1.2 * (len(blob) - max_bytes) / max(per_weight, 1e-3)) + 1)
        keep = torch.ones_like(mags, dtype=torch.bool)
        keep[order[:pruned]] = False
        out, offset = dict(qsd), 0
        for n in names:
            q = qsd[n]["q"]
            out[n] = {**qsd[n], "q": q * keep[offset : offset + q.numel()].view_as(q)}
            offset += q.numel()
        blob = pack(out)
    return out, blob, pruned


def settings_env(settings: dict) -> dict[str, str]:
    return {k: str(int(v) if isinstance(v, bool) else v) for k, v in settings.items()}


def model_from_artifact(blob: bytes, device: torch.device, source: str = "artifact",
                        args: Hyperparameters | None = None) -> tuple[nn.Module, Hyperparameters]:
    """A fresh model built from the settings stored in the artifact, loaded with its dequantized weights. The
    starter's container stores no settings: its model is the one `args` (this run's settings) describes."""
    qsd, settings = unpack_artifact(blob, source)
    if settings is not None:
        args = Hyperparameters(settings_env(settings))
    # [starter]
    elif args is None:
        raise ConfigError(f"{source}: a starter artifact carries no settings; score it with the run's (SCORE_ARTIFACT)")
    # [/starter]
    model = build_model(args, device)
    try:
        model.load_state_dict(dequantize_state_dict(qsd), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{source}: its tensors do not fit the model these settings build (for a starter artifact, "
                          f"set the env vars it was trained with, e.g. BASELINE=1): {str(e).splitlines()[-1].strip()}") from e
    model.after_load()
    return model, args


# Counted code: the script itself (CODE_PACK=0), or its counted copy: the source a run's settings reach (FEATURES),
# minified, brotli-compressed (3% under lzma), in a self-extracting file that runs as train_gpt.py. The compressed
# bytes are a triple-quoted latin-1 string literal, one character each but the few escaped: 1% over them, where
# base85 adds 25%.
CODE_PACK_HEAD = b"#coding:latin-1\nimport brotli;exec(brotli.decompress('''"
CODE_PACK_TAIL = b"'''.encode('latin-1')))\n"
CODE_ESCAPES = {0: b"\\0", 13: b"\\r", 92: b"\\\\"}  # what a literal cannot hold (a raw \r reads as \n)


def escape_code_byte(b: int, after: bytes) -> bytes:
    if b == 0 and after.isdigit():  # \0 before a digit would read as a longer octal escape
        return b"\\x00"
    if b == 39 and after in (b"'", b""):  # a quote before another, or the last, could close the literal
        return b"\\'"
    return CODE_ESCAPES.get(b, bytes([b]))


def pack_code(source: bytes) -> bytes:
    z = COMPRESSORS["brotli"][0](source)
    return CODE_PACK_HEAD + b"".join(escape_code_byte(b, z[i + 1 : i + 2]) for i, b in enumerate(z)) + CODE_PACK_TAIL


def plain_code(code: bytes) -> bytes:
    """The source of a script file, packed or not."""
    if code.startswith(CODE_PACK_HEAD):
        literal = code[len(CODE_PACK_HEAD) : -len(CODE_PACK_TAIL)].decode("unicode_escape")  # latin-1 + escapes
        return COMPRESSORS["brotli"][1](literal.encode("latin-1"))
    return code


# [codegen]
import ast  # only the counted copy's maker parses the source

FEATURE_MARK = re.compile(r"# \[(/?)(\w+)\]$")


def strip_features(source: str, dropped: tuple[str, ...]) -> str:
    """The source without the marked code of the dropped features, DROPPED_FEATURES naming them."""
    kept, depth = [], 0
    for line in source.splitlines(keepends=True):
        mark = FEATURE_MARK.search(line.rstrip())
        if mark and mark[2] in dropped:
            if line.lstrip().startswith("#"):  # a block's first or last line; else one marked line
                depth += -1 if mark[1] else 1
        elif not depth:
            kept.append(line)
    if depth:
        raise ValueError(f"unbalanced feature markers in train_gpt.py (depth {depth} at the end)")
    return "".join(kept).replace("DROPPED_FEATURES = ()", f"DROPPED_FEATURES = {dropped!r}", 1)


class BlankSettingDocs(ast.NodeTransformer):
    """Empties the settings' docs (S's 5th argument, Derived's 1st): only records/settings_doc.py reads them, from
    the readable source."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        at = {"S": 4, "Derived": 0}.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if at is not None and len(node.args) > at:
            node.args[at] = ast.Constant("")
        return node


@cache
def make_counted_copy(source: bytes, dropped: tuple[str, ...]) -> bytes:
    """The counted copy of a readable source: the dropped features left out, comments and docstrings stripped,
    minified (python-minifier, as the records; names other files or the log use are kept), packed."""
    try:
        import python_minifier
    except ImportError:
        raise ConfigError("CODE_PACK=1 counts a minified copy: pip install python-minifier (requirements.txt), "
                          "or set CODE_PACK=0") from None
    text = ast.unparse(BlankSettingDocs().visit(ast.parse(strip_features(source.decode("utf-8"), dropped))))
    # hoisted literals only repeat what the compressor already shares: 1.5% larger packed; one line: 0.3% smaller
    minified = python_minifier.minify(text, remove_literal_statements=True, rename_globals=False, hoist_literals=False,
                                      prefer_single_line=True)
    return pack_code(minified.encode("utf-8"))
# [/codegen]


# -----------------------------
# EVALUATION
# -----------------------------

def build_sentencepiece_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token byte tables: UTF-8 bytes of the piece without its leading U+2581, whether it has that leading
    space, and whether the token is a boundary (control/unknown/unused). Byte-fallback pieces are 1 byte."""
    size = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return tuple(torch.tensor(a, device=device) for a in (base, space, boundary))


def count_target_bytes(prev_ids: Tensor, tgt_ids: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    # A target costs its base bytes, plus one for its leading space unless it starts a document.
    base, space, boundary = luts
    return base[tgt_ids].to(torch.int32) + (space[tgt_ids] & ~boundary[prev_ids]).to(torch.int32)


def load_tokenizer(args: Hyperparameters) -> spm.SentencePieceProcessor:
    path = Path(args.tokenizer_path)
    if not path.is_file():
        raise ConfigError(
            f"TOKENIZER_PATH={path} does not exist: download it with `python3 data/cached_challenge_fineweb.py "
            "--variant sp1024` (it fetches the tokenizer too), point TOKENIZER_PATH at a SentencePiece .model, "
            "or run with SMOKE=1"
        )
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise ConfigError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({e}); point it at a .model file")
    if int(sp.vocab_size()) != args.vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={path} has a vocabulary of {int(sp.vocab_size())} but VOCAB_SIZE={args.vocab_size}: "
                          f"set VOCAB_SIZE={int(sp.vocab_size())} or use the tokenizer the shards were built with")
    return sp


def eval_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) per window over the target stream: every target is scored exactly once,
    with as much left context as the window allows; the last window is aligned to the end of the stream."""
    windows, scored = [], 0
    start = 0
    while scored < num_targets:
        start = min(start, num_targets - seq_len)
        windows.append((start, scored - start))
        scored = start + seq_len
        start += stride
    return windows


def matches(name: str, patterns: str) -> bool:
    """Whether a parameter or module name matches one of comma-separated shell patterns ("blocks.*,*.c_q")."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns.split(",") if p)


def eval_batch(args: Hyperparameters, world_size: int, seq_len: int) -> int:
    # Windows per batch per rank, sized like a training micro-batch.
    return max(1, args.val_batch_size // (world_size * grad_accum(args, world_size) * seq_len))


def val_byte_counter(args: Hyperparameters, sp: spm.SentencePieceProcessor, num_val_tokens: int, device: torch.device):
    """What add_scores counts bytes with: the val byte sidecar (per token, bytes of the original text) when
    DATA_PATH has one, else the tokenizer's tables, which would count CaseOps markers as text: refused."""
    sidecar = load_val_byte_sidecar(args.data_path, num_val_tokens)
    if sidecar is not None:
        return sidecar.to(device)
    if any(sp.piece_to_id(m) != sp.unk_id() for m in "\ue001\ue002\ue003\ue004"):
        raise ConfigError(f"TOKENIZER_PATH={args.tokenizer_path} is a CaseOps tokenizer but DATA_PATH={args.data_path} "
                          "has no val byte sidecar (fineweb_val_bytes_*.bin): bpb would count transformed text; "
                          "fetch the data with data/cached_challenge_fineweb.py or build it with --caseops")
    return build_sentencepiece_luts(sp, args.vocab_size, device)


def add_scores(tok_loss, mask, x, y, idx, luts, totals, losses) -> None:
    # totals: (loss sum, byte sum) in float64; losses: per-target losses by target index, or None.
    # luts: the tokenizer's byte tables, or a val byte sidecar (a tensor: bytes per val token, target = idx + 1).
    totals[0] += tok_loss[mask].double().sum()
    target_bytes = luts[idx[mask] + 1] if isinstance(luts, Tensor) else count_target_bytes(x, y, luts)[mask]
    totals[1] += target_bytes.double().sum()
    if losses is not None:
        losses[idx[mask]] = tok_loss[mask]


def score_windows(model, tokens, windows, seq_len, batch, luts, totals, losses) -> None:
    """Score windows (start, first scored offset) in batches of one shape (padded with windows that count for
    nothing)."""
    offsets = torch.arange(seq_len, device=tokens.device)
    with torch.no_grad():
        for b in range(0, len(windows), batch):
            part = windows[b : b + batch]
            pad = batch - len(part)
            starts = torch.tensor([s for s, _ in part] + [part[0][0]] * pad, device=tokens.device)
            first = torch.tensor([f for _, f in part] + [seq_len] * pad, device=tokens.device)
            idx = starts[:, None] + offsets
            x, y = tokens[idx], tokens[idx + 1]
            with autocast(tokens.device):
                tok_loss = model(x, y).float()
            add_scores(tok_loss, offsets[None, :] >= first[:, None], x, y, idx, luts, totals, losses)


def finish(totals: Tensor, losses: Tensor | None, num_targets: int) -> tuple[float, float]:
    """Exact sums over ranks -> (val_loss, val_bpb); every target was scored by exactly one rank."""
    if distributed_now():
        for t in (totals,) + ((losses,) if losses is not None else ()):
            dist.all_reduce(t)
    val_loss = totals[0].item() / num_targets
    return val_loss, val_loss / math.log(2.0) * num_targets / totals[1].item()


def evaluate(args, model, val_tokens, luts, rank, world_size, device, *, seq_len=None, stride=None,
             losses=None, label="val"):
    """Score every val target once, windows of seq_len (default TRAIN_SEQ_LEN) every stride (default seq_len)
    targets, split over ranks. Returns (val_loss, val_bpb, stats); losses (zeros), if given, gets each target's."""
    seq_len = seq_len or args.train_seq_len
    num_targets = val_tokens.numel() - 1
    windows = eval_windows(num_targets, seq_len, stride or seq_len)
    mine = windows[len(windows) * rank // world_size : len(windows) * (rank + 1) // world_size]
    batch = eval_batch(args, world_size, seq_len)
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    t0 = time.perf_counter()
    model.eval()
    parts = [mine[b : b + batch] for b in range(0, len(mine), batch)]  # whole batches: only the last one padded
    for k, part in enumerate(parts, 1):
        score_windows(model, tokens, part, seq_len, batch, luts, totals, losses)
        if rank == 0 and 10 * k // len(parts) > 10 * (k - 1) // len(parts):  # progress at each tenth
            print(f"eval:{label} {100 * k // len(parts)}% windows:{min(k * batch, len(mine))}/{len(mine)} "
                  f"time:{time.perf_counter() - t0:.0f}s", flush=True)
    model.train()
    return *finish(totals, losses, num_targets), {"windows": len(windows)}


def warm_up(net, params, vocab_size, device, shapes) -> float:
    """Compile an adaptive path's graphs on random tokens and drop the gradients: compiling reads no val token
    and takes no step. shapes: (batch, seq_len, with_grad). Returns seconds."""
    t0 = time.perf_counter()
    for batch, seq_len, with_grad in shapes:
        x, y = torch.randint(0, vocab_size, (2, batch, seq_len), device=device)  # two tensors, as scoring passes
        with torch.set_grad_enabled(with_grad), autocast(device):
            loss = net(x, y).float().mean()
        if with_grad:
            loss.backward()
    for p in params:
        p.grad = None
    sync(device)
    return time.perf_counter() - t0


def within_budget(args, t_path: float, t_loop: float, done: int, total: int) -> bool:
    """Adapting goes on while finishing at the pace so far (adapting included: it errs long) stays within
    EVAL_MAX_SECONDS of the path's start; after that, scoring alone finishes the path."""
    now = time.perf_counter()
    rest = (now - t_loop) * (total - done) / done if done else 0.0  # no pace yet before the first scores
    return now - t_path + rest <= args.eval_max_seconds


def agree(flag: bool, device: torch.device) -> bool:
    # A decision that changes control flow around collectives: True only if every rank says so.
    if not distributed_now():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def ttt_params(model: nn.Module, args: Hyperparameters) -> list[nn.Parameter]:
    # The copy's parameters that TTT_PARAMS names, switched on for training (the copy starts frozen).
    params = [p.requires_grad_() for name, p in model.named_parameters() if matches(name, args.ttt_params)]
    if not params:
        raise ConfigError(f"TTT_PARAMS={args.ttt_params!r} matches no parameter; names look like "
                          f"{[n for n, _ in model.named_parameters()][:4]}")
    return params


class ChunkSGD:
    """TTT's training on chunk c of a token stream cut into TTT_CHUNK_TOKENS chunks: the chunk's whole
    EVAL_SEQ_LEN sequences (a remainder is not trained on, as #2014's), dealt over ranks in runs (a stream each; a
    rank short of one trains zero-weight copies last: one shape), get TTT_EPOCHS SGD steps on their mean loss
    (momentum TTT_MOMENTUM kept across chunks, gradients averaged over ranks, clipped at TTT_GRAD_CLIP, LR TTT_LR
    cosine-decayed over the chunks) on the parameters matching TTT_PARAMS."""

    def __init__(self, args, model, net, rank, world_size, device):
        self.args, self.model, self.net = args, model, net
        self.params = ttt_params(model, args)
        self.opt = torch.optim.SGD(self.params, lr=args.ttt_lr, momentum=args.ttt_momentum)
        seq_len = args.eval_seq_len
        self.num_seqs = args.ttt_chunk_tokens // seq_len
        self.per_rank = -(-self.num_seqs // world_size)
        mine = list(range(self.num_seqs * rank // world_size, self.num_seqs * (rank + 1) // world_size))
        self.weight = torch.tensor([1.0] * len(mine) + [0.0] * (self.per_rank - len(mine)), device=device)
        self.seq_starts = torch.tensor((mine + [0] * self.per_rank)[: self.per_rank], device=device) * seq_len
        self.offsets = torch.arange(seq_len, device=device)

    def train(self, tokens: Tensor, c: int, num_chunks: int) -> None:
        args = self.args
        idx = (c * args.ttt_chunk_tokens + self.seq_starts)[:, None] + self.offsets
        x, y = tokens[idx], tokens[idx + 1]
        for g in self.opt.param_groups:
            g["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (num_chunks - 1)))
        for _ in range(args.ttt_epochs):
            with autocast(tokens.device):
                loss = (self.net(x, y, args.train_stream).float().mean(1) * self.weight).sum() / self.num_seqs
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            if distributed_now():  # the per-rank sums add up to the mean over the chunk
                flat = torch.cat([g.flatten() for g in grads])
                dist.all_reduce(flat)
                for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(f.view_as(g))
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, args.ttt_grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.model.after_optimizer_step()


# [ttt]
def evaluate_ttt(args, base_model, val_tokens, luts, rank, world_size, device, *, losses=None):
    """Score-first TTT on a copy of base_model: each TTT_CHUNK_TOKENS chunk of targets is scored (sliding
    windows, no gradients), then trained on (ChunkSGD); the last chunk is never trained on.
    Returns (val_loss, val_bpb, stats)."""
    t_path = time.perf_counter()
    seq_len, chunk = args.eval_seq_len, args.ttt_chunk_tokens
    num_targets = val_tokens.numel() - 1
    num_chunks = -(-num_targets // chunk)
    windows = [[] for _ in range(num_chunks)]
    # A window is scored with the chunk of its first scored target, so before any update that uses its targets.
    for start, first in eval_windows(num_targets, seq_len, args.eval_stride or seq_len):
        windows[(start + first) // chunk].append((start, first))
    model = copy.deepcopy(base_model).requires_grad_(False).eval()
    net = compiled(model, args)
    trainer = ChunkSGD(args, model, net, rank, world_size, device)
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    # No larger than a chunk's share of windows: a padded batch is paid for in full.
    batch = min(eval_batch(args, world_size, seq_len), -(-max(map(len, windows)) // world_size))
    # Scoring in eval mode, adapting in training mode (NORM_PCT_DROPOUT acts there, as #1520's): both graphs compiled.
    compile_s = warm_up(net, trainer.params, args.vocab_size, device, [(batch, seq_len, False)]) + \
        warm_up(net.train(), trainer.params, args.vocab_size, device, [(trainer.per_rank, seq_len, True)]) \
        if args.compile else 0.0
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    score_s, adapted, adapting, t_loop = 0.0, 0, True, time.perf_counter()
    for c in range(num_chunks):
        t = time.perf_counter()
        part = windows[c][len(windows[c]) * rank // world_size : len(windows[c]) * (rank + 1) // world_size]
        score_windows(net, tokens, part, seq_len, batch, luts, totals, losses)
        sync(device)
        score_s += time.perf_counter() - t
        if rank == 0 and (c + 1) * 10 // num_chunks > c * 10 // num_chunks:
            print(f"eval:ttt {(c + 1) * 100 // num_chunks}% chunks:{c + 1}/{num_chunks} adapted:{adapted} "
                  f"time:{time.perf_counter() - t_path:.0f}s", flush=True)
        if c == num_chunks - 1:
            break
        adapting = adapting and agree(within_budget(args, t_path, t_loop, (c + 1) * chunk, num_targets), device)
        if not adapting:
            continue
        model.train()
        trainer.train(tokens, c, num_chunks)  # chunk c was scored just above
        model.eval()
        adapted += 1
    loop_s = time.perf_counter() - t_loop
    vl, vb = finish(totals, losses, num_targets)
    return vl, vb, {"compile": compile_s, "score": score_s, "adapt": loop_s - score_s,
                    "adapted": f"{adapted}/{num_chunks - 1}chunks"}
# [/ttt]


def adapter_sizes(model: nn.Module, patterns: str) -> list[tuple[nn.Module, int, int]]:
    """(module, input features, output features) of the modules named by patterns that the model calls on a float
    tensor and that return one, in module order; read from a forward of one token."""
    sizes = {}

    def probe(m, inp, out):
        if inp and torch.is_tensor(inp[0]) and inp[0].is_floating_point() and torch.is_tensor(out):
            sizes.setdefault(m, (inp[0].size(-1), out.size(-1)))

    named = [m for name, m in model.named_modules() if matches(name, patterns)]
    hooks = [m.register_forward_hook(probe) for m in named]
    ids = torch.zeros(1, 1, dtype=torch.int64, device=next(model.parameters()).device)
    with torch.no_grad():
        model(ids, ids)
    for h in hooks:
        h.remove()
    return [(m, *sizes[m]) for m in named if m in sizes]


class LoRA(nn.Module):
    """Adapters per batch row ("slot") on each module named by LORA_TARGETS: a forward hook adds
    LORA_SCALE * x @ A[slot] @ B[slot] to its output, x its first input, so any MODEL adapts unchanged (GPT: c_q,
    c_k, c_v, proj, fc; attn and mlp as wholes, from their normed input; lm_head or tied_head; a looped block's
    modules once per pass, GPT.split_passes). B starts at 0 (no
    change); A from one draw for all slots, so a document scores the same whatever slot it lands in. active = False
    switches them off without unhooking (phased TTT trains the model alone), so a compiled model keeps its graphs."""

    def __init__(self, model: nn.Module, patterns: str, rank: int, slots: int, seed: int, scale: float = 1.0,
                 init_std: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        if isinstance(model, GPT):
            model.split_passes()
        targets = adapter_sizes(model, patterns)
        if not targets:
            raise ConfigError(f"LORA_TARGETS={patterns!r} matches no module called on a tensor; names look like "
                              f"{[n for n, m in model.named_modules() if isinstance(m, CastedLinear)][:4]}")
        dev = next(model.parameters()).device
        self.A = nn.ParameterList(nn.Parameter(torch.empty(slots, n_in, rank, device=dev)) for _, n_in, _ in targets)
        self.B = nn.ParameterList(nn.Parameter(torch.empty(slots, rank, n_out, device=dev)) for *_, n_out in targets)
        self.init_std = init_std  # [lora_init]
        self.draw(seed)
        self.active = True
        for (m, *_), a, b in zip(targets, self.A, self.B):
            m.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a @ b) if self.active
                                    else out)

    @torch.no_grad()
    def draw(self, seed: int) -> None:
        # Every slot from scratch: B = 0, A (and A_init) uniform in +-1/sqrt(fan-in) from the seed; with init_std
        # (LORA_A_STD, LORA_B_STD), from N(0, std) (#1090's init, one draw every document starts from).
        gen = torch.Generator(device=self.A[0].device).manual_seed(seed)
        for a, b in zip(self.A, self.B):
            n_in, rank = a.shape[1:]
            a.copy_((2 * torch.rand(n_in, rank, generator=gen, device=a.device) - 1) / n_in ** 0.5)
            b.zero_()
            if any(self.init_std):  # [lora_init]
                a.copy_(self.init_std[0] * torch.randn(n_in, rank, generator=gen, device=a.device))  # [lora_init]
                b.copy_(self.init_std[1] * torch.randn(*b.shape[1:], generator=gen, device=b.device))  # [lora_init]
        self.A_init, self.B_init = [a.detach().clone() for a in self.A], [b.detach().clone() for b in self.B]

    @torch.no_grad()
    def reset(self, slots: Tensor, warm_a: bool) -> None:
        # warm_a: A keeps what the slot's previous document (earlier in the stream, fully scored) taught it.
        for a, a_init, b, b_init in zip(self.A, self.A_init, self.B, self.B_init):
            b[slots] = b_init[slots]
            if not warm_a:
                a[slots] = a_init[slots]


class SlotAdam(torch.optim.Optimizer):
    """Adam with decoupled weight decay (AdamW) over per-slot tensors (dim 0 = slot), one step count per slot:
    reset(slots) restarts slots for new documents, step(on) updates only the slots in `on`."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def reset(self, slots: Tensor) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(m=torch.zeros_like(p), v=torch.zeros_like(p), t=p.new_zeros(p.size(0), 1, 1))
                for buf in state.values():
                    buf[slots] = 0

    @torch.no_grad()
    def step(self, on: Tensor) -> None:
        on = on.to(torch.float32)[:, None, None]
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                state = self.state[p]
                state["t"] += on
                state["m"].lerp_(p.grad, (1 - beta1) * on)
                state["v"].lerp_(p.grad.square(), (1 - beta2) * on)
                t = state["t"].clamp_min(1)
                p.mul_(1 - lr * group["weight_decay"] * on)
                p.sub_(lr * on * state["m"] / (1 - beta1 ** t) / ((state["v"] / (1 - beta2 ** t)).sqrt() + eps))


def attach_lora(args: Hyperparameters, model: nn.Module, seed: int) -> tuple[LoRA, SlotAdam]:
    lora = LoRA(model, args.lora_targets, args.lora_rank, args.lora_slots, seed, args.lora_scale,
                (args.lora_a_std, args.lora_b_std))
    return lora, SlotAdam(lora.parameters(), args.lora_lr, (args.lora_beta1, args.lora_beta2), args.lora_eps, args.lora_wd)


def val_documents(val_tokens: Tensor) -> list[tuple[int, int]]:
    # (first, end) target indices of each document: a target belongs to the document of its input token, and
    # documents start at BOS.
    num_targets = val_tokens.numel() - 1
    bounds = sorted({0, num_targets, *(val_tokens[:num_targets] == BOS_ID).nonzero().flatten().tolist()})
    return list(zip(bounds, bounds[1:]))


def lora_tokens(val_tokens: Tensor, device: torch.device, seq_len: int) -> Tensor:
    # Windows may run past the stream's end; those positions are blanked like every unscored one.
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    return torch.cat([tokens, tokens.new_zeros(seq_len)])


def lora_round(net, opt, rows, tokens, seq_len, chunk, luts, totals, losses, adapting, step_all=False):
    """One round of LoRA TTT over batch rows [document start, next chunk start, document end] (or None): scores
    each row's next `chunk` targets with up to seq_len tokens of context from its document, then, while adapting,
    one Adam step on that same loss trains the rows whose document goes on. step_all: every row holding a document
    steps, the others on a zero gradient (weight decay, momentum), as one AdamW over the batch does. Advances the
    rows; returns (targets scored, rows trained)."""
    device = tokens.device
    start, chunk_start, end = (torch.tensor([row[i] if row else 0 for row in rows], device=device) for i in range(3))
    stop = torch.minimum(chunk_start + chunk, end)
    # Windows only as long as this round's longest context (whole chunks, at most seq_len): early chunks cost little.
    width = min(seq_len, -(-int((stop - start).max()) // chunk) * chunk)
    idx = torch.maximum(start, stop - width)[:, None] + torch.arange(width, device=device)
    # Tokens past this chunk's last target are not scored yet: they are blanked, never read.
    known = idx < stop[:, None]
    scored = known & (idx >= chunk_start[:, None])
    x, y = torch.where(known, tokens[idx], 0), torch.where(known, tokens[idx + 1], 0)
    train = (stop < end) & adapting
    with torch.set_grad_enabled(bool(train.any())), autocast(device):
        tok_loss = net(x, y).float()
    add_scores(tok_loss.detach(), scored, x, y, idx, luts, totals, losses)
    if train.any():
        ((tok_loss * scored).sum(1) / scored.sum(1).clamp_min(1) * train).sum().backward()
        opt.step(torch.tensor([row is not None for row in rows], device=device) if step_all else train)
        opt.zero_grad(set_to_none=True)
    for row, s in zip(rows, stop.tolist()):
        if row:
            row[1] = s
    return int(scored.sum()), int(train.sum())


def lora_progress(label: str, before: int, done: int, mine: int, num_docs: int, t_path: float) -> None:
    if done * 10 // max(mine, 1) > before * 10 // max(mine, 1):
        print(f"eval:{label} {done * 100 // mine}% targets:{done}/{mine} docs:{num_docs} "
              f"time:{time.perf_counter() - t_path:.0f}s", flush=True)


# [lora_ttt]
def evaluate_lora_ttt(args, base_model, val_tokens, luts, rank, world_size, device, *, losses=None):
    """Per-document LoRA TTT on a copy of base_model. LORA_SLOTS rows each hold a document (stream order; ranks
    split documents by position), a row taking the next document as soon as its own is scored; each round is a
    lora_round of LORA_CHUNK_TOKENS (context: up to EVAL_SEQ_LEN tokens of the document). A row's adapters reset
    with each new document. Returns (val_loss, val_bpb, stats)."""
    t_path = time.perf_counter()
    seq_len, slots = args.eval_seq_len, args.lora_slots
    num_targets = val_tokens.numel() - 1
    docs = [(a, b) for a, b in val_documents(val_tokens) if a * world_size // num_targets == rank]
    mine = sum(b - a for a, b in docs)
    docs = iter(docs)
    model = copy.deepcopy(base_model).requires_grad_(False)
    lora, opt = attach_lora(args, model, args.seed)
    net = compiled(model, args, dynamic=None)  # lora_round's windows grow with the chunks: one more graph
    tokens = lora_tokens(val_tokens, device, seq_len)
    compile_s = warm_up(net, list(lora.parameters()), args.vocab_size, device,
                        [(slots, seq_len, True), (slots, seq_len, False)]) if args.compile else 0.0
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    rows = [None] * slots  # per row: [document start, next chunk start, document end]
    done, num_docs, adapted, adapting, t_loop = 0, 0, 0, True, time.perf_counter()
    while True:
        fresh = [False] * slots
        for r, row in enumerate(rows):
            if row is None or row[1] == row[2]:
                doc = next(docs, None)
                rows[r] = doc and [doc[0], doc[0], doc[1]]
                fresh[r] = doc is not None
        if not any(rows):
            break
        fresh = torch.tensor(fresh, device=device)
        lora.reset(fresh, args.lora_warm_a)
        opt.reset(fresh)
        num_docs += int(fresh.sum())
        adapting = adapting and within_budget(args, t_path, t_loop, done, mine)
        for row in rows if args.lora_chunk_context else ():
            if row:
                row[0] = row[1]  # the context starts at the chunk
        scored, trained = lora_round(net, opt, rows, tokens, seq_len, args.lora_chunk_tokens, luts, totals, losses,
                                     adapting)
        adapted += trained
        before, done = done, done + scored
        if rank == 0:
            lora_progress("lora_ttt", before, done, mine, num_docs, t_path)
    loop_s = time.perf_counter() - t_loop
    vl, vb = finish(totals, losses, num_targets)
    return vl, vb, {"compile": compile_s, "score_and_adapt": loop_s, "adapted": f"{adapted}chunks", "docs": num_docs}
# [/lora_ttt]


def length_batches(docs: list[tuple[int, int]], slots: int) -> tuple[list[list[int]], list[int]]:
    """The record's document batches: document indices sorted by length (ties in stream order) cut into batches of
    `slots`, and the order they are taken in: longest batch first (ties in length order)."""
    length = [b - a for a, b in docs]
    by_length = sorted(range(len(docs)), key=length.__getitem__)
    batches = [by_length[i : i + slots] for i in range(0, len(docs), slots)]
    return batches, sorted(range(len(batches)), key=lambda k: -length[batches[k][-1]])


def sgd_pass(args, model, net, stream, rank, world_size, device) -> None:
    # Phased TTT's global step: ChunkSGD over a stream of scored tokens, every chunk but the last; frozen again after.
    trainer = ChunkSGD(args, model, net, rank, world_size, device)
    num_chunks = -(-(stream.numel() - 1) // args.ttt_chunk_tokens)
    for c in range(num_chunks - 1):
        trainer.train(stream, c, num_chunks)
    model.requires_grad_(False)


def evaluate_phased_ttt(args, base_model, val_tokens, luts, rank, world_size, device, *, losses=None):
    """Phased score-first TTT, the records' (#1855, #2014) evaluation, on a copy of base_model. Documents go in
    length_batches of LORA_SLOTS, dealt over ranks in turn; a batch's rows start together and run lora_rounds in
    step, in chunks of LORA_CHUNK_TOKENS or LORA_SHORT_CHUNKS' for the batch's longest document (every row stepping,
    as the record's AdamW over the batch), adapters reset per batch (B = 0; A warm with LORA_WARM_A=1, except that a
    short batch starts from A's draw and leaves A as it found it, as the record's separate adapters for it). Phases:
    once the batches taken hold boundary k = PHASED_TTT_PREFIX_DOCS * k / PHASED_TTT_NUM_PHASES documents (k = 1..),
    the copy itself trains on the first `boundary` of them in length order, all scored, their tokens (each document
    with the BOS that ends it) concatenated: one pass of ChunkSGD, the last chunk left out; then new adapters are
    drawn. Returns (val_loss, val_bpb, stats)."""
    t_path = time.perf_counter()
    seq_len, slots, phases = args.eval_seq_len, args.lora_slots, args.phased_ttt_num_phases
    num_targets = val_tokens.numel() - 1
    docs = val_documents(val_tokens)
    batches, order = length_batches(docs, slots)
    prefix = min(len(docs), args.phased_ttt_prefix_docs)
    boundaries = [prefix * k // phases for k in range(1, phases + 1)] if prefix else []
    mine = sum(docs[d][1] - docs[d][0] for k in order[rank::world_size] for d in batches[k])
    model = copy.deepcopy(base_model).requires_grad_(False)
    net = compiled(model, args, dynamic=None)  # lora_round's windows grow with the chunks: one more graph
    lora, opt = attach_lora(args, model, args.seed)
    tokens = lora_tokens(val_tokens, device, seq_len)
    compile_s = warm_up(net, list(lora.parameters()), args.vocab_size, device,
                        [(slots, seq_len, True), (slots, seq_len, False)]) if args.compile else 0.0
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    taken, phase, done, adapted, global_s, adapting, t_loop = 0, 0, 0, 0, 0.0, True, time.perf_counter()
    for turn in range(0, len(order), world_size):
        if turn + rank < len(order):
            batch = batches[order[turn + rank]]
            rows = [[docs[d][0], docs[d][0], docs[d][1]] for d in batch] + [None] * (slots - len(batch))
            held = torch.tensor([row is not None for row in rows], device=device)
            short = len(batch) < slots
            longest = max(docs[d][1] - docs[d][0] for d in batch) + 1  # tokens, as the record counts a document
            chunk = next((c for limit, c in args.short_chunks if longest <= limit), args.lora_chunk_tokens)
            warm_a = [a.detach().clone() for a in lora.A] if short else None
            lora.reset(held, args.lora_warm_a and not short)
            opt.reset(held)
            while any(row and row[1] < row[2] for row in rows):
                adapting = adapting and within_budget(args, t_path, t_loop, done, mine)
                scored, trained = lora_round(net, opt, rows, tokens, seq_len, chunk, luts, totals, losses, adapting,
                                             step_all=True)
                adapted += trained
                before, done = done, done + scored
                if rank == 0:
                    lora_progress("phased_ttt", before, done, mine, taken + len(batch), t_path)
            if short:
                with torch.no_grad():
                    for a, keep in zip(lora.A, warm_a):
                        a.copy_(keep)
        taken += sum(len(batches[k]) for k in order[turn : turn + world_size])
        if phase < len(boundaries) and taken >= boundaries[phase]:
            t = time.perf_counter()
            lora.active = False  # the copy trains alone
            # The first `boundary` documents taken, in length order (batch, then row): all scored by now.
            trained = [d for k in sorted(order[: turn + world_size]) for d in batches[k]][: boundaries[phase]]
            if agree(adapting, device):
                stream = torch.cat([val_tokens[docs[d][0] : docs[d][1] + 1] for d in trained])
                sgd_pass(args, model, net, stream.to(device=device, dtype=torch.int64), rank, world_size, device)
            phase += 1
            lora.active = True
            lora.draw(args.seed + phase)
            global_s += time.perf_counter() - t
            if rank == 0:
                print(f"eval:phased_ttt phase:{phase}/{phases} docs:{len(trained)} "
                      f"time:{time.perf_counter() - t_path:.0f}s", flush=True)
    loop_s = time.perf_counter() - t_loop
    vl, vb = finish(totals, losses, num_targets)
    return vl, vb, {"compile": compile_s, "score_and_adapt": loop_s - global_s, "global_sgd": global_s,
                    "adapted": f"{adapted}chunks", "phases": phase, "docs": len(docs)}


def evaluate_roundtrip(args, model, val_tokens, luts, rank, world_size, device, *, losses=None):
    """Plain windows of TRAIN_SEQ_LEN, as the starter scores: the artifact's reference score."""
    return evaluate(args, compiled(model, args), val_tokens, luts, rank, world_size, device, losses=losses,
                    label="roundtrip")


def evaluate_sliding(args, model, val_tokens, luts, rank, world_size, device, *, losses=None):
    """Windows of EVAL_SEQ_LEN every EVAL_STRIDE targets: each target scored once, with up to a window of context."""
    return evaluate(args, compiled(model, args), val_tokens, luts, rank, world_size, device, seq_len=args.eval_seq_len,
                    stride=args.eval_stride, losses=losses, label="sliding_window")


def sliding_differs(args: Hyperparameters) -> bool:
    # A stride of a whole TRAIN_SEQ_LEN window is the roundtrip itself.
    return args.eval_stride > 0 and (args.eval_stride, args.eval_seq_len) != (args.train_seq_len, args.train_seq_len)


@dataclass(frozen=True)
class EvalPath:
    """A way to score the artifact's model. enabled(args): whether a run takes it. run(args, model, val_tokens, luts,
    rank, world_size, device, losses=None) -> (val_loss, val_bpb, stats): scores every val target exactly once, on
    its own copy if it changes the model. adapts: it learns from val tokens, so it is score-first (no update uses a
    token before that token is scored); the log declares it and records/verify.py checks the declaration."""

    enabled: Callable[[Hyperparameters], bool]
    run: Callable[..., tuple[float, float, dict]]
    adapts: bool = False


# Each enabled path prints final_<name> (the roundtrip: final_<quant>_<compressor>_roundtrip), in this order; the
# best is the submission's score. docs/evaluation.md describes each.
EVAL_PATHS = {
    "roundtrip": EvalPath(lambda args: True, evaluate_roundtrip),
    "sliding_window": EvalPath(sliding_differs, evaluate_sliding),
    "ttt": EvalPath(lambda args: args.ttt_enabled, evaluate_ttt, adapts=True),  # [ttt]
    "lora_ttt": EvalPath(lambda args: args.lora_ttt_enabled, evaluate_lora_ttt, adapts=True),  # [lora_ttt]
    "phased_ttt": EvalPath(lambda args: args.phased_ttt_enabled, evaluate_phased_ttt, adapts=True),
}


# -----------------------------
# PLAN
# -----------------------------
# PLAN=1 python3 train_gpt.py predicts a run before any GPU is rented (records/plan.py, docs/planner.md): the planner
# lives outside this file, so a record run does not count its bytes.


def load_planner():
    """records/plan.py beside this script, or None where it is absent (a frozen record folder)."""
    path = SCRIPT_DIR / "records" / "plan.py"
    if not path.exists():
        return None
    sys.modules.setdefault("train_gpt", sys.modules[__name__])  # the planner imports this running script, not a copy
    if "plan" not in sys.modules:  # once per process (tests and records/ tools may have imported it already)
        spec = importlib.util.spec_from_file_location("plan", path)
        sys.modules["plan"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["plan"])
    return sys.modules["plan"]


def print_plan(args: Hyperparameters) -> int:
    planner = load_planner()
    if planner is None:
        raise ConfigError(f"PLAN=1 needs records/plan.py beside {SCRIPT_DIR / 'train_gpt.py'} (a frozen record folder "
                          "has none): run PLAN=1 from the repository")
    return planner.print_plan(args)


def log_run_plan(run: Run, val_tokens: int) -> dict | None:
    """A real run's plan, for its own world size, GPU and val split, logged by rank 0 before training (off the
    clock) and checked against the measurements at train_done."""
    if not run.master:
        return None
    try:  # best-effort: the plan informs a run, it never ends one
        planner = load_planner()
        if planner is None:
            run.log("plan: skipped, no records/plan.py beside train_gpt.py")
            return None
        hw = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else ""
        plan = planner.make_plan(run.args, run.world_size, planner.gpu_kind(hw, run.args.plan_gpu),
                                 len(run.counted_code), val_tokens)
        for line in planner.plan_lines(run.args, plan):
            run.log(line)
        return plan
    except Exception as e:
        run.log(f"WARNING: plan: failed, training goes on without it: {type(e).__name__}: {e}")
        return None


# -----------------------------
# MAIN
# -----------------------------
# main() runs the phases in order, each a function of what the previous ones returned: read_settings -> setup_run
# -> load_val_data -> (CUDA) log_run_plan -> build_training -> warm_up_training -> train -> finish_training ->
# export_artifact -> score_stages -> write_artifact -> score_artifact.


@dataclass
class Run:
    """This process's part of the run: settings, rank, device, the log, the counted code, the scores so far."""

    args: Hyperparameters
    rank: int
    world_size: int
    distributed: bool  # launched by torchrun: a process group exists
    device: torch.device
    code: bytes  # the file that runs, plain or packed
    counted_code: bytes  # what the artifact's size counts
    logfile: object = None
    results: list = field(default_factory=list)  # (what, val_loss, val_bpb, per-target losses) of each final_ score
    plan: dict | None = None  # rank 0's plan of this run (docs/plan.md), checked at train_done

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        return grad_accum(self.args, self.world_size)

    def log(self, msg: str, console: bool = True) -> None:
        if self.master:
            if console:
                print(msg, flush=True)
            self.logfile.write(msg + "\n")
            self.logfile.flush()


def packed_copy(code: bytes, args: Hyperparameters) -> bytes:
    """The counted copy of a script for these settings: the script itself when it is one, else made from it."""
    source = plain_code(code)
    if code != source:
        return code
    return make_counted_copy(source, tuple(name for name, reached in FEATURES.items() if not reached(args)))


def counted_code(code: bytes, args: Hyperparameters) -> bytes:
    """The code bytes the artifact counts: the plain source (CODE_PACK=0), or the counted copy."""
    return packed_copy(code, args) if args.code_pack else plain_code(code)


def read_settings() -> Hyperparameters:
    """The env's settings; with SCORE_ARTIFACT, the artifact's own settings under the env vars set now (data paths)."""
    args = Hyperparameters()
    if not args.score_artifact:
        return args
    path = Path(args.score_artifact)
    if not path.is_file():
        raise ConfigError(f"SCORE_ARTIFACT={path} does not exist; give the path of an artifact file")
    _, stored = unpack_artifact(path.read_bytes(), str(path))
    stored = settings_env({k: v for k, v in (stored or {}).items()
                           if k not in ("RUN_ID", "TOKEN_LOSS_PATH", "ARTIFACT_PATH", "ALLOW_OTHER_TOKENIZER")})
    used = {k: v for k, v in os.environ.items()
            if k not in stored or k in SCORE_MAY_SET or k.startswith(SCORE_MAY_SET_PREFIXES)}
    args = Hyperparameters({**stored, **used})
    args.unused_env = sorted(k for k in os.environ.keys() - used.keys() if os.environ[k] != stored[k])
    return args


def check_outputs(args: Hyperparameters) -> None:
    """Every place the run writes, checked before anything is read or trained: a failure there after training would
    lose the model. Folders that the run makes (logs, CHECKPOINT_DIR) need a writable nearest existing parent."""
    places = [("logs", "logs/log.txt", True)]
    if args.token_loss_path:
        places.append(("TOKEN_LOSS_PATH", args.token_loss_path, False))
    if not args.score_artifact:
        places += [("ARTIFACT_PATH", args.artifact_path, False),
                   ("CHECKPOINT_DIR", f"{args.checkpoint_dir}/step.pt", True)]
    for name, file, made in places:
        folder = Path(file).absolute().parent
        while made and not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(f"{name}: {folder} is not a writable folder (missing, a file, or read-only); create it or "
                              f"fix it{'' if name == 'logs' else f', or set {name} elsewhere'}")


def prepare_device(args: Hyperparameters, device: torch.device) -> None:
    """A CUDA device as every run sets it: TF32 matmuls, the attention kernels SDP_BACKENDS allows."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # Flash serves plain causal attention; DOC_ATTENTION's masked fallback (no varlen_attn) needs mem_efficient or math.
        enable_sdp_backends(args.sdp_backends)


def setup_run(args: Hyperparameters) -> Run:
    """Device, process group, log file, the log's header (the settings first), seeds."""
    code = Path(__file__).resolve().read_bytes()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    prepare_device(args, device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        dist.barrier()
    logfile = None
    if rank == 0:
        os.makedirs("logs", exist_ok=True)
        logfile = open(f"logs/{args.run_id}.txt", "a", encoding="utf-8")
        print(f"logs/{args.run_id}.txt")
    run = Run(args, rank, world_size, distributed, device, code, counted_code(code, args), logfile)
    log_header(run)
    activate_attention(run)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return run


def log_header(run: Run) -> None:
    """The log is a full record: settings, overrides, code, versions, hardware, and the source itself."""
    args, source = run.args, plain_code(run.code)
    run.log(f"run_id:{args.run_id}")
    for name, value in sorted(args.settings.items()):
        run.log(f"setting:{name}={int(value) if isinstance(value, bool) else value}")
    for name in sorted(args.settings):
        if name in os.environ:
            run.log(f"env:{name}={os.environ[name]}")
    if args.unused_env:
        run.log(f"warning: SCORE_ARTIFACT: env {', '.join(f'{k}={os.environ[k]}' for k in args.unused_env)} not used: the "
                f"artifact's own settings replace them ({', '.join(f'{k}={args.settings[k]}' for k in args.unused_env)})")
    code_path = Path(__file__).resolve()
    run.log(f"code_sha256:{hashlib.sha256(run.code).hexdigest()} code_bytes:{len(run.code)} code_path:{code_path}")
    run.log(f"code plain_bytes:{len(source)} packed_bytes:{len(packed_copy(run.code, args))} "
            f"counted:{'packed' if args.code_pack else 'plain'} sha256:{hashlib.sha256(run.counted_code).hexdigest()}")
    if args.code_pack:  # the counted copy itself (in base85), so that freeze can write what is counted
        run.log("counted_code:" + base64.b85encode(run.counted_code).decode("ascii"), console=False)
    run.log(f"versions python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
            f"sentencepiece:{spm.__version__}")
    hw = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else f"CPU({os.cpu_count()} cores)"
    run.log(f"hardware:{run.world_size}x{hw} world_size:{run.world_size} grad_accum_steps:{run.grad_accum_steps}")
    run.log("source_begin", console=False)
    run.log(source.decode("utf-8").removesuffix("\n"), console=False)
    run.log("source_end", console=False)


def activate_attention(run: Run) -> None:
    """Logs the attention kernel build_model will use and what decided it; FA3 is switched on through PyTorch's
    registry (never imported here), which routes SDPA's and varlen_attn's flash kernels to it."""
    capability, fa3_installed = attention_support(run.device)
    kernel, why = attention_kernel(run.device.type, run.args.doc_attention, capability, fa3_installed)
    if kernel.startswith("fa3"):
        torch.nn.attention.activate_flash_attention_impl("FA3")
    run.log(f"attention:kernel={kernel} doc_attention:{int(run.args.doc_attention)} device:{run.device.type} "
            f"capability:{capability} fa3_installed:{int(fa3_installed)} why:{why}")


# [presets]
def ensure_smoke_data(args: Hyperparameters, master: bool) -> None:
    """SMOKE=1 builds the embedded dataset and tokenizer once, if they are missing (rank 0 builds, others wait),
    only into its own cache: a DATA_PATH or TOKENIZER_PATH elsewhere is the user's and is never written."""
    has_shards, has_tokenizer = bool(glob.glob(args.train_files)), Path(args.tokenizer_path).is_file()
    if not args.smoke or (has_shards and has_tokenizer):
        return
    own, paths = smoke_cache(str(args.vocab_size)), {"DATA_PATH": args.data_path, "TOKENIZER_PATH": args.tokenizer_path}
    foreign = [name for name, path in paths.items() if Path(path).resolve() != Path(own[name]).resolve()]
    if foreign:
        missing = "DATA_PATH" if not has_shards else "TOKENIZER_PATH"
        what = "has no train shards (fineweb_train_*.bin)" if missing == "DATA_PATH" else "does not exist"
        raise ConfigError(f"SMOKE=1: {missing}={paths[missing]} {what}, and the smoke builds data only into its own "
                          f"cache, not {', '.join(f'{n}={paths[n]}' for n in foreign)}: fix {missing}, or unset "
                          f"{' and '.join(foreign)} to build the smoke's own")
    if master:
        cmd = [sys.executable, str(SCRIPT_DIR / "data/build_shards.py"), "--embedded", "--out-dir", args.data_path,
               "--train-tokenizer", args.tokenizer_path, "--vocab-size", str(args.vocab_size), "--overwrite"]
        print("smoke: building the embedded dataset: " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise ConfigError("smoke: data/build_shards.py failed (see above); fix it or set DATA_PATH and TOKENIZER_PATH")
    if dist.is_initialized():
        dist.barrier()
# [/presets]


@dataclass
class ValData:
    tokens: Tensor  # the whole val split, int64 on the device
    luts: tuple[Tensor, Tensor, Tensor] | Tensor  # the tokenizer's byte tables, or the val byte sidecar


def load_val_data(run: Run) -> ValData:
    """The whole val split, checked to be the challenge's, and what its bytes are counted with."""
    args = run.args
    ensure_smoke_data(args, run.master)  # [presets]
    sp = load_tokenizer(args)
    seq_len = max(args.train_seq_len, args.eval_seq_len)
    tokens = load_validation_tokens(args.val_files, args.vocab_size, seq_len).to(run.device, torch.int64)
    check_val_split(args.data_path, tokens.numel())
    run.log(check_tokenizer_sha256(args.data_path, args.tokenizer_path, args.allow_other_tokenizer))
    luts = val_byte_counter(args, sp, tokens.numel(), run.device)
    run.log(f"val_loader:shards pattern={args.val_files} tokens:{tokens.numel()}")
    docs = val_documents(tokens)
    if 0 < args.val_docs < len(docs):
        # A prefix of whole documents; verify.py refuses such a log as a submission.
        end = docs[args.val_docs][0]
        if end - 1 < seq_len:
            raise ConfigError(f"VAL_DOCS={args.val_docs} keeps {end} val tokens, fewer than one window of {seq_len + 1}: "
                              "raise VAL_DOCS or shorten the sequences")
        run.log(f"val_prefix:docs={args.val_docs} of:{len(docs)} tokens:{end} of:{tokens.numel()} (not a submission score)")
        tokens, luts = tokens[:end], luts[:end] if isinstance(luts, Tensor) else luts
    run.log(f"val_bytes:{'sidecar' if isinstance(luts, Tensor) else 'tokenizer_tables'}")
    return ValData(tokens, luts)


@dataclass
class Training:
    """What the training phases share: the raw model, the one that runs (compiled, DDP), optimizers, data, EMA,
    and the switches made so far (name -> step)."""

    base_model: nn.Module
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    muon: Muon
    loader: object
    ema: WeightEMA | None
    switched: dict[str, int] = field(default_factory=dict)
    seq_len: int = 0  # this stage's training sequence length (TRAIN_SEQ_SCHEDULE)
    resume: tuple[Path, dict] | None = None  # RESUME's checkpoint (path, state), read and checked, until restored
    last_checkpoint: Path | None = None  # the newest checkpoint this run wrote


def build_training(run: Run) -> Training:
    args = run.args
    resume = read_checkpoint(run) if args.resume else None  # a bad checkpoint is refused before anything is built
    loader = BatchPrefetcher(TRAIN_LOADERS[args.train_loader](args, run.rank, run.world_size), run.device,
                             args.prefetch_batches)
    run.log(f"train_loader:dataset:{Path(args.data_path).resolve().name} train_shards:{len(loader.files)} "
            f"prefetch_batches:{loader.depth} pinned:{int(loader.pin)}")
    base_model = build_model(args, run.device)
    if args.qat_start < 1:  # [qat]
        configure_qat(base_model, args)  # [qat]
    model = compiled(base_model, args)
    if run.distributed:
        model = ddp_without_matrices(model, base_model, run.device)
        run.log(f"muon:reduce_scatter matrices:{len(base_model.param_groups()['matrix'])}")
    optimizers, muon = build_optimizers(args, base_model)
    run.log(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    ema = WeightEMA(base_model, args.ema_decay, args.ema_warmup) if args.ema_decay > 0 else None
    return Training(base_model, model, optimizers, muon, loader, ema, seq_len=args.seq_stages[0][0], resume=resume)


def train_step(run: Run, t: Training, lr_scale: float, momentum: float) -> Tensor:
    """One optimizer step on one global batch (grad_accum_steps micro-batches); returns the mean loss, on device.
    No host-device synchronisation: the batch is copied from pinned memory without waiting, the loss stays on the
    device, clipping scales on the device. A step waits for the device only (1) on logging and checkpoint steps,
    which read the loss, and (2) in TrainClock.tick on several ranks: every step when a time budget or checkpoint
    cadence needs an agreed clock (as the starter's wallclock check), else every STOP_CHECK_STEPS steps."""
    args, accum = run.args, run.grad_accum_steps
    per_rank = args.grad_clip_norm > 0 and args.grad_clip_scope == "rank"
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    train_loss = torch.zeros((), device=run.device)
    for micro in range(accum):
        if run.distributed:  # DDP averages the last micro-step's gradients, unless each rank clips its own first
            t.model.require_backward_grad_sync = micro == accum - 1 and not per_rank
        x, y = t.loader.next_batch(args.train_batch_tokens, t.seq_len, accum)
        with autocast(run.device):
            loss = t.model(x, y, args.train_stream).mean()
        train_loss += loss.detach()
        (loss / accum).backward()
    for g in t.muon.param_groups:
        g["momentum"] = momentum
    for opt in t.optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
    step_optimizers(t.optimizers, t.muon, args.grad_clip_norm, getattr(t.base_model, "clip_order", None), per_rank)
    t.base_model.after_optimizer_step()
    return train_loss / accum


def warm_up_training(run: Run, t: Training) -> None:
    """WARMUP_STEPS steps (at least one per length of TRAIN_SEQ_SCHEDULE, in turn) compile every graph; then weights,
    optimizer state and the data position are restored."""
    args = run.args
    if args.warmup_steps <= 0:
        return
    if args.compile:
        run.log("compiling: warm-up steps run the compiled graphs once, then everything is restored")
    model_state = copy.deepcopy(t.base_model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in t.optimizers]
    data_position = t.loader.state_dict()
    lengths = [n for n, _ in args.seq_stages]
    steps = max(args.warmup_steps, len(lengths))
    for i in range(steps):
        t.seq_len = lengths[i % len(lengths)]
        train_step(run, t, 1.0, muon_momentum(args, 0))
        run.log(f"warmup_step:{i + 1}/{steps} seq_len:{t.seq_len}")
    t.seq_len = lengths[0]
    t.base_model.load_state_dict(model_state)
    for opt, state in zip(t.optimizers, opt_states):
        opt.load_state_dict(state)
    t.loader.load_state_dict(data_position)


# Without a per-step agreement of the clock (MAX_WALLCLOCK_SECONDS and CHECKPOINT_EVERY_SECONDS both 0), ranks
# agree on a stop signal every this many steps: no new per-step host-device sync.
STOP_CHECK_STEPS = 10


class TrainClock:
    """The one source of training progress: steps taken and milliseconds trained (validation and checkpoint pauses
    excluded), the same on every rank. It drives the LR schedule, Muon momentum, QAT, depth recurrence, checkpoints
    and the stop, and carries a stop signal received by any rank to all of them."""

    def __init__(self, run: Run):
        self.run, self.budget_ms = run, train_budget_ms(run.args)
        # Time decides something on every step (the stop, a checkpoint's cadence): ranks must agree on it each step.
        self.agreed = self.budget_ms is not None or run.args.checkpoint_every_seconds > 0
        self.step = 0
        self.ms = 0.0  # training time at the last tick, agreed by all ranks: what progress reads
        self.banked_ms = 0.0  # training time up to the last pause
        self.stop_signal = 0  # a SIGTERM or SIGINT every rank now knows of (its number), 0 if none
        self._t0 = 0.0

    def start(self) -> None:
        sync(self.run.device)
        self._t0 = time.perf_counter()

    def pause(self) -> None:
        sync(self.run.device)
        self.banked_ms += 1000.0 * (time.perf_counter() - self._t0)

    def tick(self, signal_received: int = 0) -> None:
        """A step is done: count it and read the time, agreed across ranks (their max) when time decides something;
        a signal this rank received (its number) is agreed in the same all-reduce."""
        self.step += 1
        ms = self.banked_ms + 1000.0 * (time.perf_counter() - self._t0)
        stop = signal_received
        if self.run.distributed:
            stop = 0  # acted on only once every rank knows
            if self.agreed or self.step % STOP_CHECK_STEPS == 0:
                reading = torch.tensor([ms, signal_received], device=self.run.device, dtype=torch.float64)
                dist.all_reduce(reading, op=dist.ReduceOp.MAX)
                ms, stop = reading.tolist()
        self.ms, self.stop_signal = ms, int(stop)

    def fraction(self) -> float:
        """How much of training is done: of ITERATIONS, or of the time budget, whichever is further."""
        return max(self.step / self.run.args.iterations, self.ms / self.budget_ms if self.budget_ms else 0.0)

    def done(self) -> bool:
        return self.step >= self.run.args.iterations or (self.budget_ms is not None and self.ms >= self.budget_ms)


def apply_switches(run: Run, t: Training, clock: TrainClock) -> None:
    """Late QAT and depth recurrence switch on once their fraction of training is done, the training length follows
    TRAIN_SEQ_SCHEDULE; each switch is logged."""
    args, frac = run.args, clock.fraction()
    t.seq_len = stage_seq_len(args, frac)
    if t.seq_len != args.seq_stages[0][0] and f"seq_len:{t.seq_len}" not in t.switched:
        t.switched[f"seq_len:{t.seq_len}"] = clock.step
        run.log(f"seq_len:{t.seq_len} step:{clock.step}/{args.iterations} train_time:{clock.ms:.0f}ms "
                f"rewarmup_steps:{args.seq_change_warmup_steps}")
    # [qat]
    if args.qat_start < 1 and "qat" not in t.switched and frac >= args.qat_start:
        set_qat(t.base_model, True)
        t.switched["qat"] = clock.step
        run.log(f"qat:on step:{clock.step}/{args.iterations} train_time:{clock.ms:.0f}ms "
                f"quant:{args.quant_attn}/{args.quant_mlp}")
    # [/qat]
    if args.recur_last >= 0 and "recurrence" not in t.switched and frac >= args.recur_start_frac:
        t.base_model.set_recurrence(True)
        t.switched["recurrence"] = clock.step
        run.log(f"recurrence:on step:{clock.step}/{args.iterations} train_time:{clock.ms:.0f}ms "
                f"layers:{args.recur_first}-{args.recur_last} loops:{args.recur_loops}")


# Checkpoints (docs/run.md "Checkpoints and resume"): one file per checkpoint, written by rank 0 with every rank's own
# part gathered into it; a header line with a sha256 of the rest catches truncation and corruption.
CHECKPOINT_MAGIC = b"PGOLF-CHECKPOINT-1\n"
EXIT_DIVERGED = 3  # a stop on a signal exits 128 + the signal's number (SIGINT 130, SIGTERM 143); ConfigError 2


def rewarm_multiplier(args: Hyperparameters, t: Training, step: int) -> float:
    # #2014's re-warm-up: after a length change at step s, the LR times (step - s + 1) / SEQ_CHANGE_WARMUP_STEPS.
    start = t.switched.get(f"seq_len:{t.seq_len}")
    if start is None or args.seq_change_warmup_steps <= 0:
        return 1.0
    return min((step - start + 1) / args.seq_change_warmup_steps, 1.0)


class RunStopped(Exception):
    """Training stopped before its artifact, on purpose and already logged (a signal, a diverged loss)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class StopSignals:
    """While training: the first SIGTERM or SIGINT asks for a checkpoint and a stop at the next step boundary; a
    second one, a second or more later, exits at once. (Ctrl-C under torchrun reaches the ranks twice within
    milliseconds: from the terminal and forwarded by torchrun.)"""

    def __init__(self):
        self.received, self._first, self._previous = 0, 0.0, {}

    def _handle(self, signum, frame) -> None:
        if self.received and time.monotonic() - self._first >= 1.0:
            os._exit(128 + signum)
        if not self.received:
            self.received, self._first = signum, time.monotonic()

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(RunStopped):
    """A SIGTERM or SIGINT after training: main() keeps the artifact and logs the scores so far."""


class EvaluationSignals(StopSignals):
    """After training nothing waits for a step boundary: a signal stops the export or evaluation at once."""

    def _handle(self, signum, frame) -> None:
        raise Interrupted(128 + signum, signal.Signals(signum).name)


def write_atomically(path: Path, data: bytes, setting: str) -> None:
    """Temporary file, fsync, rename, the rename made durable: a reader sees the old file or the whole new one. A
    failed write (a full disk) removes its temporary file and stops the run in one line naming the setting."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
    except OSError as e:
        raise ConfigError(f"{setting}: writing {path} failed ({e.strerror or e}); no partial file is left: free space "
                          f"or set {setting} to another folder") from None
    finally:  # also on a signal
        tmp.unlink(missing_ok=True)


# [checkpoint]
def _cpu(tree):
    # A CPU copy of every tensor in a nest of dicts, lists and tuples (model and optimizer states).
    return torch.utils._pytree.tree_map(lambda x: x.detach().cpu().clone() if isinstance(x, Tensor) else x, tree)


def rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def code_sha256(run: Run) -> str:
    # Of the plain source: the plain and the packed copy of one script are the same code.
    return hashlib.sha256(plain_code(run.code)).hexdigest()


def to_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(raw) -> dict:
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def training_state(run: Run, t: Training, clock: TrainClock) -> dict | None:
    """The complete training state at a step boundary, on rank 0 (None elsewhere): what the ranks share once, and
    each rank's own part: its RNG streams and optimizer states (Muon keeps each rank's share of the momentum)."""
    part = {"rng": rng_state(run.device), "optimizers": _cpu([opt.state_dict() for opt in t.optimizers])}
    parts = [to_bytes(part)]  # gathered serialized: gather_object's own unpickling of tensors fails in torch 2.14
    if run.distributed:
        parts = [None] * run.world_size if run.master else None
        dist.gather_object(to_bytes(part), parts, dst=0)
    if not run.master:
        return None
    parts = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in parts]
    return {"code_sha256": code_sha256(run), "settings": dict(run.args.settings), "world_size": run.world_size,
            "train_data_sha256": train_data_sha256(run.args.train_files),
            "step": clock.step, "train_ms": clock.banked_ms, "switched": dict(t.switched),
            "model": _cpu(t.base_model.state_dict()), "loader": t.loader.state_dict(), "ranks": parts,
            "ema": None if t.ema is None else {"updates": t.ema.updates, "average": _cpu(t.ema.average)}}


def write_checkpoint(run: Run, t: Training, clock: TrainClock) -> Path:
    """Write the training state atomically (temporary file, fsync, rename) and keep the newest CHECKPOINT_KEEP.
    Weights gone non-finite are a divergence: the last good checkpoint is never replaced by a bad one."""
    args, c0 = run.args, time.perf_counter()
    finite = torch.stack([torch.isfinite(p).all() for p in t.base_model.parameters()]).all().item()
    check_finite(run, t, "non-finite weights", 0.0 if finite else math.nan, clock.step)
    state = training_state(run, t, clock)
    path = Path(args.checkpoint_dir) / f"step_{clock.step:07d}.pt"
    if run.master:
        payload = to_bytes(state)
        write_atomically(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload,
                         "CHECKPOINT_DIR")
        for old in sorted(path.parent.glob("step_*.pt"))[: -args.checkpoint_keep]:
            old.unlink()
        run.log(f"checkpoint:{path} step:{clock.step} bytes:{path.stat().st_size} "
                f"time:{1000.0 * (time.perf_counter() - c0):.0f}ms (not in train_time)")
    if run.distributed:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is on disk
    t.last_checkpoint = path
    return path


def checkpoint_path(args: Hyperparameters) -> Path:
    if args.resume != "auto":
        return Path(args.resume)
    found = sorted(Path(args.checkpoint_dir).glob("step_*.pt"))
    if not found:
        raise ConfigError(f"RESUME=auto: no checkpoint (step_*.pt) in CHECKPOINT_DIR={args.checkpoint_dir}; set "
                          "RUN_ID or CHECKPOINT_DIR to the interrupted run's, or RESUME to a checkpoint file")
    return found[-1]


def read_checkpoint(run: Run) -> tuple[Path, dict]:
    """RESUME's checkpoint, whole and written by this code with the settings and world size of this run."""
    path = checkpoint_path(run.args)
    if not path.is_file():
        raise ConfigError(f"RESUME={path}: no such checkpoint file; give a step_*.pt file or RESUME=auto")
    raw, n = path.read_bytes(), len(CHECKPOINT_MAGIC)
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise ConfigError(f"RESUME={path}: not a train_gpt.py checkpoint (no {CHECKPOINT_MAGIC[:-1].decode()} header)")
    if hashlib.sha256(raw[n + 65 :]).hexdigest().encode() != raw[n : n + 64]:
        raise ConfigError(f"RESUME={path}: truncated or corrupt ({len(raw)} bytes, checksum mismatch); "
                          "resume from another checkpoint")
    state = from_bytes(raw[n + 65 :])
    mine, theirs = run.args.settings, state["settings"]
    differ = [f"{k}={mine.get(k, '(unset)')} (checkpoint: {theirs.get(k, '(unset)')})"
              for k in sorted(set(mine) | set(theirs)) if k not in RESUME_MAY_DIFFER and mine.get(k) != theirs.get(k)]
    if state["world_size"] != run.world_size:
        differ.append(f"world_size {run.world_size} (checkpoint: {state['world_size']})")
    if state["code_sha256"] != code_sha256(run):
        differ.append(f"code sha256 {code_sha256(run)[:12]} (checkpoint: {state['code_sha256'][:12]})")
    if state["train_data_sha256"] != (data := train_data_sha256(run.args.train_files)):
        differ.append(f"train shards of DATA_PATH={run.args.data_path}: names and token counts sha256 {data[:12]} "
                      f"(checkpoint: {state['train_data_sha256'][:12]})")
    if differ:
        raise ConfigError(f"RESUME={path}: this run would compute differently: {'; '.join(differ)}; resume with "
                          "the checkpoint's settings, code, world size and train data")
    return path, state


def restore_training(run: Run, t: Training, clock: TrainClock) -> None:
    """Put RESUME's state in place of the fresh one (after warm-up, which compiles and is undone anyway)."""
    path, state = t.resume
    part = from_bytes(state["ranks"][run.rank].numpy().tobytes())
    t.base_model.load_state_dict(state["model"])
    for opt, opt_state in zip(t.optimizers, part["optimizers"]):
        opt.load_state_dict(opt_state)
    if t.ema is not None:
        t.ema.updates = state["ema"]["updates"]
        for average, saved in zip(t.ema.average, state["ema"]["average"]):
            average.copy_(saved)
    t.loader.load_state_dict(state["loader"])
    t.switched = dict(state["switched"])
    if "qat" in t.switched:  # [qat]
        set_qat(t.base_model, True)  # [qat]
    set_rng_state(part["rng"], run.device)
    clock.step, clock.banked_ms = state["step"], state["train_ms"]
    clock.ms = clock.banked_ms
    t.resume = None
    switched = ",".join(f"{k}@{v}" for k, v in t.switched.items()) or "none"
    run.log(f"resumed:{path} step:{clock.step} train_time:{clock.banked_ms:.0f}ms switched:{switched}")


def resume_command(run: Run, path: Path) -> str:
    """The command that continues this run: its explicit settings, its RUN_ID, RESUME=<the checkpoint>."""
    env = {"RESUME": str(path.resolve()), "RUN_ID": run.args.run_id}
    env.update({k: os.environ[k] for k in sorted(run.args.settings) if k in os.environ and k != "RESUME"})
    launch = f"torchrun --standalone --nproc_per_node={run.world_size}" if run.distributed else shlex.quote(sys.executable)
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + f" {launch} {shlex.quote(sys.argv[0])}"
# [/checkpoint]


def check_finite(run: Run, t: Training, what: str, value: float, step: int) -> None:
    """A non-finite loss (agreed: an all-reduced value) stops the run before any checkpoint or artifact."""
    if math.isfinite(value):
        return
    lrs = " ".join(f"{k}:{v:g}" for k, v in t.base_model.learning_rates(run.args).items())
    message = (f"diverged: {what} at step:{step}: the learning rates are likely too high ({lrs}); last good "
               f"checkpoint:{t.last_checkpoint or 'none'}; no artifact written")
    run.log(message)
    raise RunStopped(EXIT_DIVERGED, message)


def throughput(run: Run, clock: TrainClock) -> str:
    """Training tokens per second over all ranks; with a plan (CUDA runs), also MFU: the plan's counted FLOPs per
    token times tokens/s over the GPUs' dense bf16 peak."""
    tokens_per_s = run.args.train_batch_tokens * clock.step / max(clock.ms / 1000.0, 1e-9)
    if run.plan is None:
        return f"tokens_per_s:{tokens_per_s:.0f}"
    peak = run.world_size * run.plan["peak_flops"]
    return f"tokens_per_s:{tokens_per_s:.0f} mfu:{100 * run.plan['flops_token'] * tokens_per_s / peak:.1f}%"


def global_loss(run: Run, train_loss: Tensor) -> float:
    if run.distributed:  # the global batch's loss, not rank 0's share
        dist.all_reduce(train_loss)
        train_loss /= run.world_size
    return train_loss.item()


def validation(run: Run, data: ValData, model: nn.Module, clock: TrainClock) -> tuple[float, float]:
    """The whole val split scored by the training model, while the clock is paused; logs the step's line."""
    args = run.args
    vl, vb, _ = evaluate(args, model, data.tokens, data.luts, run.rank, run.world_size, run.device,
                         label=f"step{clock.step}")
    run.log(f"step:{clock.step}/{args.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} "
            f"train_time:{clock.banked_ms:.0f}ms step_avg:{clock.banked_ms / max(clock.step, 1):.2f}ms")
    return vl, vb


def train(run: Run, data: ValData, t: Training) -> TrainClock:
    """The timed loop: steps until ITERATIONS or the time budget, validating every VAL_LOSS_EVERY steps,
    checkpointing every CHECKPOINT_EVERY_SECONDS of training time and on a stop signal."""
    args = run.args
    clock = TrainClock(run)
    if t.resume is not None:
        restore_training(run, t, clock)
    checkpoint_ms = clock.banked_ms  # training time at the last checkpoint
    t.swa = WeightSWA(t.base_model) if args.swa_every else None  # [swa]
    with StopSignals() as signals:
        clock.start()
        while not clock.done():
            apply_switches(run, t, clock)
            if args.val_loss_every > 0 and clock.step % args.val_loss_every == 0:
                clock.pause()
                validation(run, data, t.model, clock)
                clock.start()
            lr_scale = lr_multiplier(args, clock.step, clock.ms) * rewarm_multiplier(args, t, clock.step)
            train_loss = train_step(run, t, lr_scale, muon_momentum(args, clock.step))
            if t.ema is not None:
                t.ema.update()
            clock.tick(signals.received)
            # [swa]
            if args.swa_every and clock.step % args.swa_every == 0 and clock.step >= swa_start(args, clock):
                t.swa.add()
            # [/swa]
            # Logging steps and checkpoints are the only ones that read the loss back from the device.
            logged = args.train_log_every > 0 and (clock.step <= 10 or clock.step % args.train_log_every == 0
                                                   or clock.done())
            due = args.checkpoint_every_seconds > 0 and clock.ms - checkpoint_ms >= 1000.0 * args.checkpoint_every_seconds
            if not (logged or due or clock.stop_signal):
                continue
            loss = global_loss(run, train_loss)
            check_finite(run, t, f"train_loss:{loss}", loss, clock.step)
            if logged:
                run.log(f"step:{clock.step}/{args.iterations} train_loss:{loss:.4f} "
                        f"train_time:{clock.ms:.0f}ms step_avg:{clock.ms / clock.step:.2f}ms {throughput(run, clock)}")
            if due or clock.stop_signal:
                clock.pause()
                path = write_checkpoint(run, t, clock)
                checkpoint_ms = clock.banked_ms
                if clock.stop_signal:
                    name = signal.Signals(clock.stop_signal).name
                    run.log(f"stopped:{name} step:{clock.step} checkpoint:{path}")
                    run.log(f"resume: {resume_command(run, path)}")
                    raise RunStopped(128 + clock.stop_signal, f"stopped by {name}")
                clock.start()
    return clock


def calibrate(run: Run, t: Training) -> dict[str, Tensor]:
    """GPTQ Hessians from the next training batches (never val), on the training clock, summed over ranks."""
    args, c0 = run.args, time.perf_counter()
    n = args.gptq_calib_batches * run.grad_accum_steps
    batches = (t.loader.next_batch(args.train_batch_tokens, args.train_seq_len, run.grad_accum_steps) for _ in range(n))
    hessians = collect_hessians(t.base_model, batches)
    for name in sorted(hessians) if run.distributed else ():
        dist.all_reduce(hessians[name])
    sync(run.device)
    run.log(f"gptq_calibration batches:{args.gptq_calib_batches} tokens:{args.gptq_calib_batches * args.train_batch_tokens} "
            f"matrices:{sum(':' not in n for n in hessians)} time:{1000.0 * (time.perf_counter() - c0):.0f}ms")
    return hessians


def finish_training(run: Run, data: ValData, t: Training, clock: TrainClock) -> tuple[dict | None, float]:
    """Still on the training clock: the EMA's average put in, GPTQ calibrated on training batches. Then the clock
    stops and the float weights get the pre-quant score. Returns (Hessians or None, the evaluation's start time)."""
    args = run.args
    if t.ema is not None:  # the averaged weights are the ones calibrated, scored and exported
        t.ema.apply()
        t.base_model.after_load()  # an average of unit rows is not unit
        run.log(f"ema:applied decay:{args.ema_decay} steps:{clock.step}")
    # [swa]
    if args.swa_every and t.swa.count > 1:  # one snapshot is the weights of its step: #1090 keeps the final ones
        t.swa.apply()
        run.log(f"swa:applied checkpoints:{t.swa.count} every:{args.swa_every} steps:{clock.step}")
    # [/swa]
    set_qat(t.base_model, False)  # the pre-quant score and the Hessians read the float weights  # [qat]
    hessians = calibrate(run, t) if args.gptq else None
    t.loader.close()  # the last training batch has been read
    clock.pause()
    eval_t0 = time.perf_counter()
    vl, vb = validation(run, data, t.model, clock)
    check_finite(run, t, f"val_loss:{vl}", vl, clock.step)  # the last check before export
    train_ms = clock.banked_ms
    if clock.step < args.iterations:
        run.log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{clock.step}/{args.iterations}")
    run.log(f"train_done steps:{clock.step} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(clock.step, 1):.2f}ms "
            f"{throughput(run, clock)}")
    if args.max_wallclock_seconds > 0 and train_ms > 1000.0 * args.max_wallclock_seconds:
        run.log(f"WARNING: training and GPTQ calibration took {train_ms:.0f}ms, over MAX_WALLCLOCK_SECONDS: "
                "raise GPTQ_RESERVE_SECONDS")
    if run.device.type == "cuda":
        run.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    if run.plan:
        peak = f"{torch.cuda.max_memory_allocated() // 2**20}MiB" if run.device.type == "cuda" else "n/a"
        run.log(f"plan_check ms_step:{train_ms / max(clock.step, 1):.2f} predicted:{run.plan['ms_step']:.2f} peak:{peak} "
                f"predicted:{run.plan['peak'] / 2**20:.0f}MiB target:{run.plan['world_size']}x{run.plan['gpu']}")
    report(run, "prequant", vl, vb, 1000.0 * (time.perf_counter() - eval_t0))
    return hessians, eval_t0


def report(run: Run, what: str, vl: float, vb: float, ms: float, losses: Tensor | None = None) -> None:
    run.log(f"final_{what} val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_time:{ms:.0f}ms")
    run.log(f"final_{what}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")
    run.results.append((what, vl, vb, losses))


def score(run: Run, data: ValData, what: str, evaluate_fn, model: nn.Module) -> None:
    """Score with one evaluation function (EvalPath.run's signature), timed; logs final_<what> and
    eval_phase:<what>, whose projection to 8 GPUs keeps compiling and spreads the rest over 8 ranks of this device."""
    sync(run.device)
    t = time.perf_counter()
    losses = torch.zeros(data.tokens.numel() - 1, device=run.device) if run.args.token_loss_path else None
    vl, vb, stats = evaluate_fn(run.args, model, data.tokens, data.luts, run.rank, run.world_size, run.device,
                                losses=losses)
    sync(run.device)
    ms = 1000.0 * (time.perf_counter() - t)
    report(run, what, vl, vb, ms, losses)
    compile_ms = 1000.0 * stats.get("compile", 0.0)
    extra = "".join(f" {k}:{1000.0 * v:.0f}ms" if isinstance(v, float) else f" {k}:{v}" for k, v in stats.items())
    run.log(f"eval_phase:{what} time:{ms:.0f}ms world_size:{run.world_size} "
            f"projected_8gpu:{compile_ms + (ms - compile_ms) * run.world_size / 8:.0f}ms{extra}")


@dataclass
class Export:
    quantized: dict[str, dict]  # the quantized state dict, before any pruning
    blob: bytes  # the artifact
    pruned: int  # weights the cap remedy zeroed


def export_artifact(args: Hyperparameters, state_dict: dict[str, Tensor], hessians: dict | None, code_bytes: int,
                    log=print) -> Export:
    """Quantize (GPTQ where Hessians are given), pack, keep the smallest compression; over the cap less the counted
    code and SIZE_MARGIN_BYTES, zero the smallest weights until it fits. records/estimate_size.py calls this too."""
    q0 = time.perf_counter()
    qsd = quantize_state_dict(state_dict, args, hessians)
    log(f"quantize attn:{args.quant_attn} mlp:{args.quant_mlp} embed:{args.quant_embed} gptq:{int(hessians is not None)} "
        f"lowrank_tensors:{sum('lr_a' in e for e in qsd.values())} time:{1000.0 * (time.perf_counter() - q0):.0f}ms")
    max_model_bytes = SIZE_CAP_BYTES - args.size_margin_bytes - code_bytes
    c0 = time.perf_counter()
    fitted, blob, pruned = prune_to_fit(qsd, args.artifact_settings(), args.compressor, args.byte_shuffle,
                                        max_model_bytes, args.export_format)
    log(f"compress:{artifact_compressor(blob)} setting:{args.compressor} model_bytes:{len(blob)} "
        f"time:{1000.0 * (time.perf_counter() - c0):.0f}ms")
    if pruned:
        log(f"cap_remedy:prune zeroed_weights:{pruned} of:{sum(e['q'].numel() for e in fitted.values() if 'q' in e)} "
            f"model_bytes:{len(blob)} max_model_bytes:{max_model_bytes}")
    if len(blob) > max_model_bytes:
        log(f"WARNING: the artifact ({len(blob)} bytes) cannot be brought under {max_model_bytes} model bytes")
    return Export(qsd, blob, pruned)


def score_stages(run: Run, data: ValData, t: Training, export: Export, gptq_used: bool) -> None:
    """The quantization gap by stage, on the training model: the QAT forward if QAT ran (round to nearest on the
    export grid), then the quantized weights before any pruning (they replace the float weights)."""
    args = run.args
    # [qat]
    if args.qat_start < 1:
        set_qat(t.base_model, True)
        score(run, data, f"{args.quant}_qat", partial(evaluate, label="qat"), t.model)
        set_qat(t.base_model, False)
    # [/qat]
    t.base_model.load_state_dict(dequantize_state_dict(export.quantized))
    t.base_model.after_load()
    score(run, data, f"{args.quant}_{'gptq' if gptq_used else 'rtn'}", partial(evaluate, label="quantized"), t.model)


def write_artifact(run: Run, blob: bytes) -> Path:
    """The artifact, written atomically; a previous run's file of that name is kept, named by its content's hash."""
    path = Path(run.args.artifact_path)
    if run.master:
        if path.is_file():
            kept = path.with_name(f"{path.name}.prev-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}")
            try:
                os.link(path, kept)  # the name keeps pointing at a whole file
            except FileExistsError:
                pass  # the same content, kept before
            except OSError:  # a file system without hard links
                os.replace(path, kept)
            run.log(f"artifact_kept:{kept} (the previous {path.name}; this run's replaces it)")
        write_atomically(path, blob, "ARTIFACT_PATH")
        if run.args.code_pack:
            packed_path = path.with_name("train_gpt.packed.py")
            packed_path.write_bytes(run.counted_code)
            run.log(f"code_packed:{packed_path} bytes:{len(run.counted_code)} (the counted code: runs as train_gpt.py)")
    return path


def log_artifact_size(run: Run, path: Path, blob: bytes) -> tuple[str, int]:
    """The size lines (the starter's three, then ours); returns (format name, total bytes)."""
    quant, compressor = run.args.quant, artifact_compressor(blob, str(path))
    fmt, total_bytes = f"{quant}_{compressor}", len(blob) + len(run.counted_code)
    run.log(f"Serialized model {quant}+{compressor}: {len(blob)} bytes")
    run.log(f"Code size: {len(run.counted_code)} bytes")
    run.log(f"Total submission size {quant}+{compressor}: {total_bytes} bytes")
    run.log(f"artifact:{path} format:{fmt} model_bytes:{len(blob)} code_bytes:{len(run.counted_code)} "
            f"total_bytes:{total_bytes} cap:{SIZE_CAP_BYTES} under_cap:{int(total_bytes <= SIZE_CAP_BYTES)}")
    if total_bytes > SIZE_CAP_BYTES:
        run.log(f"WARNING: total submission size {total_bytes} bytes is OVER the {SIZE_CAP_BYTES}-byte cap "
                f"by {total_bytes - SIZE_CAP_BYTES} bytes: this artifact is not a valid submission")
    return fmt, total_bytes


def score_artifact(run: Run, data: ValData, path: Path, train_ms: float, eval_t0: float) -> None:
    """The submission's score: a fresh model built from the artifact file alone, scored by every enabled path of
    EVAL_PATHS; the best of them is the submission's."""
    args = run.args
    if run.distributed:
        dist.barrier()
    blob = path.read_bytes()
    if not blob.startswith((SEAL_MAGIC, STARTER_MAGIC)):  # accepted: an older train_gpt.py's artifact
        run.log(f"warning: {path} carries no checksum (written before artifacts had one): scored unverified")
    fmt, total_bytes = log_artifact_size(run, path, blob)
    under_cap = total_bytes <= SIZE_CAP_BYTES
    fresh, _ = model_from_artifact(blob, run.device, str(path), run.args)
    if args.compile:  # every path compiles its own shapes
        torch._dynamo.config.recompile_limit = 64
    paths = {name: p for name, p in EVAL_PATHS.items() if p.enabled(args)}
    for name, p in paths.items():
        run.log(f"eval_path:{name} adapts:{int(p.adapts)} rule:{'score_first' if p.adapts else 'none'}")
    if args.eval_seq_len > args.train_seq_len:
        run.log(f"eval_rope:ntk factor:{args.eval_seq_len / args.train_seq_len:.4f}")
    first = len(run.results)
    for name, p in paths.items():
        score(run, data, f"{fmt}_roundtrip" if name == "roundtrip" else name, p.run, fresh)
    if run.results[0][0] == "prequant":  # the quantization gap by stage, in bpb over the float weights
        stages = run.results[1 : first + 1]
        run.log("quant_gap " + " ".join(f"{r[0]}:{r[2] - run.results[0][2]:+.4f}" for r in stages))
    what, vl, vb, losses = min(run.results[first:], key=lambda r: r[2])
    if args.token_loss_path and run.master:
        np.save(args.token_loss_path, losses.cpu().numpy())
        run.log(f"token_losses:{args.token_loss_path} count:{losses.numel()}")
    eval_ms = 1000.0 * (time.perf_counter() - eval_t0)
    run.log(f"submission score:{what} val_loss:{vl:.8f} val_bpb:{vb:.8f} total_bytes:{total_bytes} "
            f"under_cap:{int(under_cap)} train_time:{train_ms:.0f}ms eval_time:{eval_ms:.0f}ms")
    if not under_cap:
        run.log(f"WARNING: OVER THE {SIZE_CAP_BYTES}-BYTE CAP ({total_bytes} bytes)")
    run.log(f"final_{what}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")


def main() -> None:
    check_launch(os.environ)
    args = read_settings()
    if args.plan:  # PLAN=1: predict the run (docs/plan.md), train nothing
        raise SystemExit(print_plan(args))
    check_outputs(args)
    run = setup_run(args)
    data = load_val_data(run)
    path = Path(args.score_artifact) if args.score_artifact else None  # the artifact, once it exists
    if not path:
        if run.device.type == "cuda":  # a plan projects GPU runs; on a CPU it would cost seconds for nothing
            run.plan = log_run_plan(run, data.tokens.numel())
        t = build_training(run)
        warm_up_training(run, t)
        clock = train(run, data, t)
    try:
        with EvaluationSignals():
            if args.score_artifact:  # scoring an artifact alone: no training, the artifact's settings
                run.log(f"score_artifact:{path} (no training; settings from the artifact, a starter one's from the env)")
                score_artifact(run, data, path, train_ms=0.0, eval_t0=time.perf_counter())
            else:
                hessians, eval_t0 = finish_training(run, data, t, clock)
                export = export_artifact(args, t.base_model.state_dict(), hessians, len(run.counted_code), run.log)
                path = write_artifact(run, export.blob)  # before the scoring: a stop there keeps it
                score_stages(run, data, t, export, hessians is not None)
                del t  # DDP's reducer holds the process group: freed after it, gloo's teardown can hang
                score_artifact(run, data, path, clock.banked_ms, eval_t0)
    except Interrupted as e:
        for what, vl, vb, _ in run.results:
            run.log(f"scored_so_far:final_{what}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")
        run.log(f"stopped:{e} during:export_or_evaluation artifact:{path or 'none (stopped before the export)'} "
                f"scored:{len(run.results)} exit:{e.code}")
        raise
    if run.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0" or isinstance(e, LaunchError):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:  # logged where it stopped
        sys.exit(e.code)
