"""The planner: PLAN=1 python3 train_gpt.py predicts a run before any GPU is rented.

The model and optimizers are built as a run builds them, on fake CUDA tensors (shapes and dtypes only: nothing is
computed or allocated), one training micro-step and one optimizer step run at the real shapes of each training
phase (the depth-recurrence switch, the sequence-length schedule), and FLOPs, memory, time, steps, evaluation time
and bytes come out. No GPU and no data are needed. It lives outside train_gpt.py so that a record run does not count
its bytes; train_gpt.py loads it by path (PLAN=1, and the plan a CUDA run logs before training). Its constants are
fitted on the records' logs in CALIBRATION; docs/plan.md gives the model and its error on each log.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if "train_gpt" not in sys.modules:  # run from train_gpt.py (PLAN=1), the running script is already registered
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402
from train_gpt import ConfigError, Hyperparameters  # noqa: E402

# PLAN_GPU=<name> -> (memory torch reports in MiB, dense bf16 peak TFLOP/s from the vendor's datasheet).
GPU_SPECS = {"H100": (81_559, 989.0), "H200": (143_771, 989.0), "A100": (81_251, 312.0)}
# Val tokens of the challenge's split (its first 50,000 FineWeb documents) per tokenizer vocabulary: sp1024 from the
# starter's log (val_loader tokens:63779840), sp8192 (caseops) from #2014's (target_tokens:47853343, + the first).
PLAN_VAL_TOKENS = {1024: 63_779_840, 8192: 47_853_344}
PLAN_VAL_DOCS = 50_000
EVAL_LIMIT_SECONDS = 600.0
# The val split's document lengths as quantiles (fraction of documents shorter, tokens), from the sorted length
# batches #2014 and #1855 log in their phased TTT (`ttp: b<k>/<n> ... dl:<shortest>-<longest>`); they sum to 48.6M
# tokens against the split's 47.9M, and the plan scales them to the split it prices.
DOC_LENGTH_QUANTILES = (
    (0, 61), (0.001, 78), (0.01, 104), (0.02, 118), (0.05, 143), (0.1, 180), (0.15, 215), (0.2, 252), (0.25, 292),
    (0.3, 335), (0.35, 384), (0.4, 442), (0.45, 501), (0.5, 568), (0.55, 641), (0.6, 723), (0.65, 819), (0.7, 935),
    (0.75, 1076), (0.8, 1260), (0.85, 1500), (0.9, 1873), (0.92, 2121), (0.94, 2508), (0.95, 2771), (0.96, 3150),
    (0.97, 3721), (0.98, 4618), (0.985, 5432), (0.99, 6689), (0.993, 8192), (0.995, 9514), (0.997, 13249),
    (0.998, 15366), (0.999, 23382), (0.9995, 28498), (0.99968, 30339), (1.0, 97114),
)


@dataclass(frozen=True)
class LogPoint:
    """A record's logged run (8xH100 SXM, torch 2.9 unless said) and our settings that express it. phases: per training
    phase as the plan splits it, (fraction of training where it ends, sequence length, looped, logged ms/step,
    training FLOPs per token as count_train_step counts it at PLAN_TORCH=2.9). fit: the phases are points of the
    time model (the others are held out). eval_s: logged evaluation seconds of eval_paths (what the log times);
    lora_s and global_s: the phased TTT's LoRA scoring and its global SGD (the tttg lines' seconds)."""

    name: str
    env: dict
    source: str
    ms_step: float
    steps: int
    phases: tuple
    fit: bool
    eval_s: float | None = None
    eval_paths: tuple = ("phased_ttt",)
    lora_s: float | None = None
    global_s: float | None = None
    model_bytes: int | None = None
    peak_mib: int | None = None
    seq_schedule: str = ""


CALIBRATION = (
    LogPoint("starter", {"BASELINE": "1"}, "reference/starter/train.log (records/.../2026-03-17_NaiveBaseline)",
             43.54, 13_780, ((1.0, 1024, False, 43.54, 135.27e6),), fit=True, peak_mib=10_184),
    LogPoint("1.1194", {"STACK": "1.1194", "TTT_ENABLED": "1"},
             "records/.../2026-03-23_LeakyReLU_LegalTTT_ParallelMuon README; FIELD_GUIDE (7,179 x 83.6 ms)",
             83.6, 7_179, ((1.0, 2048, False, 83.6, 239.99e6),), fit=True, eval_s=529.0,
             eval_paths=("roundtrip", "sliding_window", "ttt")),
    LogPoint("#1855", {"STACK": "1855"}, "reference/pr1855/train_seed42.log (STACK=1855)", 121.25, 4_945,
             ((0.35, 2048, False, 96.3, 296.2e6), (1.0, 2048, True, 140.9, 444.1e6)), fit=True,
             eval_s=508.8, lora_s=431.0, global_s=77.8, model_bytes=15_865_260, peak_mib=41_717),
    LogPoint("#2014", {}, "reference/pr2014/train_seed42.log (the default's recipe: progressive context 1k/2k/3k)", 121.9, 4_888,
             ((0.10, 1024, False, 92.3, None), (0.35, 2048, False, 96.8, None), (0.70, 2048, True, 141.0, None),
              (1.0, 3072, True, 146.1, None)), fit=False, eval_s=572.4, lora_s=545.2, global_s=27.2,
             model_bytes=15_943_811, peak_mib=41_707, seq_schedule="1024@0.100,2048@0.700,3072@1.000"),
)
# #1855's matmul FLOPs per token (looped) as count_train_step counts them, forward and forward + backward: the scale of
# the TTT rates fitted on it (another model's TTT costs in proportion; attention's share follows the window widths).
FIT_MATMUL_FORWARD, FIT_MATMUL_TRAIN = 106_433_752, 319_301_256

# Evaluation runs below training's achieved FLOP rate (small batches, sequential chunks). Fitted to the 1.1194 record
# (~62.0M val tokens, stride 64, seq 2048): roundtrip + sliding windows ~120 s and score-first TTT (32K chunks,
# 3 epochs) ~409 s, against their counted FLOPs at its training rate.
PLAN_EVAL_EFFICIENCY = {"batched": 0.57, "adaptive": 0.21}
# Compressed bytes per byte of the codes' entropy, fitted to #1855's 15,865,260 model bytes (its per-group lrzip
# container on its trained weights): (15,865,260 - 223,941 stored bytes) / 15,846,035 entropy bytes that
# estimate_model_bytes counts for its shapes (trained rows are a little more peaked than the Gaussian stand-in).
PLAN_COMPRESSION_RATIO = 0.9871


def doc_lengths(num_docs: int, num_tokens: int) -> list[float]:
    """The val split's document lengths in ascending order, DOC_LENGTH_QUANTILES scaled to num_tokens in all."""
    qs, ls = zip(*DOC_LENGTH_QUANTILES)
    out, j = [], 0
    for i in range(num_docs):
        q = (i + 0.5) / num_docs
        while qs[j + 1] < q:
            j += 1
        out.append(ls[j] + (ls[j + 1] - ls[j]) * (q - qs[j]) / (qs[j + 1] - qs[j]))
    scale = num_tokens / sum(out)
    return [v * scale for v in out]


def lora_work(lengths: list[float], slots: int, seq: int, chunk: int, world_size: int,
              batched: bool) -> tuple[float, float]:
    """(window tokens, rounds) per GPU of LoRA TTT (lora_round): a row scores `chunk` targets a round with a window
    of its context so far (at most seq); batched (phased): `slots` documents of like length start together and pad
    to the longest; else each row takes the next document when done (no padding)."""
    tokens = rounds = 0.0

    def windows(length):  # sum of a document's window widths over its rounds, and the rounds
        r = math.ceil(length / chunk)
        full = min(r, seq // chunk)
        return chunk * full * (full + 1) / 2 + (r - full) * seq, r

    if batched:
        for b in range(0, len(lengths), slots):
            w, r = windows(lengths[min(b + slots, len(lengths)) - 1])
            tokens, rounds = tokens + slots * w, rounds + r
    else:
        for length in lengths:
            w, r = windows(length)
            tokens, rounds = tokens + w, rounds + r / slots
    return tokens / world_size, rounds / world_size


def fit_lora_constants() -> tuple[float, float]:
    """(seconds per window token at #1855's forward FLOPs, seconds per round) of phased TTT's LoRA scoring, solved
    from #1855's and #2014's logged LoRA seconds (their total less the global SGD's)."""
    rows = []
    for p in CALIBRATION:
        if p.lora_s is not None:
            args = Hyperparameters(p.env)
            lengths = doc_lengths(PLAN_VAL_DOCS, PLAN_VAL_TOKENS[8192])
            work = lora_work(lengths, args.lora_slots, args.eval_seq_len, args.lora_chunk_tokens, 8, True)
            rows.append((*work, p.lora_s))
    (a1, b1, t1), (a2, b2, t2) = rows
    det = a1 * b2 - a2 * b1
    return (t1 * b2 - t2 * b1) / det, (a1 * t2 - a2 * t1) / det


LORA_TOKEN_S, LORA_ROUND_S = fit_lora_constants()


def entropy_bits(codes: Tensor) -> float:
    """Empirical entropy in bits per code of an int8 code tensor: what an entropy coder pays per code."""
    counts = torch.bincount(codes.flatten().to(torch.int64) + 128, minlength=256).double()
    p = counts[counts > 0] / codes.numel()
    return float(-(p * p.log2()).sum())


def estimate_model_bytes(args: Hyperparameters, state: dict[str, Tensor]) -> int:
    """Artifact model bytes of a state dict's shapes: train_gpt's own quantizer (quantize_state_dict) on Gaussian
    stand-in rows of those shapes gives what is stored; its int8 codes cost their entropy x PLAN_COMPRESSION_RATIO,
    everything else (scales, low-rank factors, float tensors) its stored bytes."""
    gen = torch.Generator().manual_seed(0)
    stand_in = {k: torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1]) if t.is_floating_point() and t.ndim
                else torch.zeros(t.shape, dtype=t.dtype) for k, t in state.items()}
    total = 0.0
    for entry in tg.quantize_state_dict(stand_in, args).values():
        for key, t in entry.items():
            if not isinstance(t, Tensor):
                continue
            coded = key == "q" and t.dtype == torch.int8
            total += t.numel() * entropy_bits(t) / 8 * PLAN_COMPRESSION_RATIO if coded else t.numel() * t.element_size()
    return int(total)
def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # The kernel a run takes on an H100 for causal attention (grouped heads natively): on fake CUDA, SDPA would pick
    # the math kernel and save (T, T) score matrices that the real run never holds.
    if attn_mask is not None:
        raise ConfigError("PLAN: document-isolated attention in training has no flash-kernel plan; unset it")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


class _PlanPatches:
    """Inside: bf16 autocast stays on for fake CUDA (torch.autocast switches itself off without a GPU), attention
    takes the flash kernel, and for torch < 2.12 RMSNorm runs in its input dtype (2.12 moved it to fp32 under
    autocast, pytorch#174824), so the plan follows the autocast rules of the torch it plans for."""

    def __init__(self, torch_version: str):
        self.old_norm = tuple(int(v) for v in torch_version.split(".")[:2]) < (2, 12)

    def __enter__(self):
        self.saved = F.scaled_dot_product_attention, F.rms_norm
        F.scaled_dot_product_attention = _flash_sdpa
        if self.old_norm:
            rms_norm = self.saved[1]

            def norm_in_input_dtype(x, *a, **kw):
                torch.set_autocast_enabled("cuda", False)
                try:
                    return rms_norm(x, *a, **kw)
                finally:
                    torch.set_autocast_enabled("cuda", True)

            F.rms_norm = norm_in_input_dtype
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.autocast_increment_nesting()

    def __exit__(self, *exc):
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)
        F.scaled_dot_product_attention, F.rms_norm = self.saved


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def count_train_step(args: Hyperparameters, micro_batch: int, torch_version: str, looped: bool = True) -> dict:
    """One training micro-step and one optimizer step of the configured model at the real shapes (looped: with depth
    recurrence on, where the model has it), on fake tensors.
    Returns counted FLOPs (forward and total, matmul and attention, causal attention halved) and bytes per GPU:
    weights, gradients, optimizer state, and the activations torch.compile saves for the backward."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # built on meta, allocating nothing, then moved once onto fake CUDA
        model = tg.cuda_layout(tg.MODELS[args.model](args), args)
    # Attention planned as causal flash over whole rows: DOC_ATTENTION's packed kernel computes at most that, and
    # varlen_attn's FLOP counter would price every (padded) segment of fake cu_seqlens at the full row length.
    model.doc_attention = False
    if args.qat_start < 1:  # as main does: the fake-quantization ops are in every step's graph
        tg.configure_qat(model, args)
    groups = {k: sum(p.numel() for p in ps) for k, ps in model.param_groups().items()}
    state = model.state_dict()  # shapes and dtypes for the byte estimate
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = model.to("cuda")
        if looped and getattr(model, "recur_last", -1) >= 0:
            model.set_recurrence(True)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        eager = copy.copy(args)
        eager.compile = False  # the plan counts optimizer state, not kernels: no torch.compile inside a fake mode
        optimizers, _ = tg.build_optimizers(eager, model)
        for p in params.values():  # as a real step: frozen parameters (#2014's softcaps) get no gradient, no state
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt_bytes = _nbytes(t for opt in optimizers for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))
        x = torch.zeros(micro_batch, args.train_seq_len, dtype=torch.int64, device="cuda")

        def loss_fn(params, buffers, x):
            return torch.func.functional_call(model, {**params, **buffers}, (x, x)).mean()

        with _PlanPatches(torch_version):
            graph = make_fx(loss_fn)(params, buffers, x)
    # Autograd cannot run on fake CUDA tensors without a GPU: the traced forward (its dtypes and kernels fixed) is
    # replayed on fake CPU tensors, through AOTAutograd with inductor's partitioner, which decides what a compiled
    # run saves for the backward (less than eager: it recomputes cheap pointwise ops).
    for node in graph.graph.nodes:
        if "device" in node.kwargs:
            node.kwargs = {**node.kwargs, "device": torch.device("cpu")}
    graph.recompile()
    saved = {}

    def forward_compiler(gm, _):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        vals = [o.meta["val"] for o in outputs[1:] if o is not None and o.op != "placeholder"]
        storages = {id(v.untyped_storage()): v.untyped_storage().nbytes() for v in vals if isinstance(v, Tensor)}
        saved["bytes"] = sum(storages.values())
        return make_boxed_func(gm.forward)

    # Plain functions, not GraphModules: FlopCounterMode's module hooks must see none of these graphs.
    step = aot_function(graph.forward, fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                        partition_fn=partial(min_cut_rematerialization_partition, compiler="inductor"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        cpu = lambda ts, grad: {k: torch.empty(t.shape, dtype=t.dtype, requires_grad=grad) for k, t in ts.items()}
        inputs = lambda: (cpu(params, True), cpu(buffers, False), torch.zeros(x.shape, dtype=x.dtype))
        step(*inputs()).backward()  # traces and partitions; the second call below only runs the two graphs
        counter = FlopCounterMode(display=False)
        with counter:
            loss = step(*inputs())
            forward = dict(counter.get_flop_counts()["Global"])
            loss.backward()
        total = counter.get_flop_counts()["Global"]

    def split(counts):  # FlopCounterMode prices causal attention as full: half of it is masked out
        attention = sum(v for op, v in counts.items() if "attention" in str(op)) / 2
        return sum(v for op, v in counts.items() if "attention" not in str(op)), attention

    tokens = micro_batch * args.train_seq_len
    (fwd_mm, fwd_attn), (mm, attn) = split(forward), split(total)
    weights = _nbytes(params.values())
    return {"groups": groups, "state": state, "weights": weights, "grads": weights, "optimizer": opt_bytes,
            "activations": saved["bytes"], "flops_token": (mm + attn) / tokens, "matmul_token": mm / tokens,
            "attention_token": attn / tokens, "forward_token": (fwd_mm + fwd_attn) / tokens,
            "forward_attention_token": fwd_attn / tokens}


def seq_schedule(args: Hyperparameters, schedule: str | None = None) -> list[tuple[float, int]]:
    """TRAIN_SEQ_SCHEDULE ("1024@0.100,2048@0.700,3072@1.000": each length until that fraction of training), or the
    one TRAIN_SEQ_LEN throughout."""
    text = getattr(args, "train_seq_schedule", "") if schedule is None else schedule
    if not text:
        return [(1.0, args.train_seq_len)]
    stages = [(float(end), int(seq)) for seq, end in (s.split("@") for s in text.split(","))]
    return stages[:-1] + [(1.0, stages[-1][1])]


def train_phases(args: Hyperparameters, schedule: str | None = None) -> list[tuple[float, float, int, bool]]:
    """Training split where its step changes: (start fraction, end fraction, sequence length, looped), by the
    sequence-length schedule and the depth-recurrence switch at RECUR_START_FRAC."""
    cuts = [end for end, _ in seq_schedule(args, schedule)]
    switch = args.recur_start_frac if args.recur_last >= 0 else 2.0
    if 0 < switch < 1:
        cuts = sorted({*cuts, switch})
    phases, start = [], 0.0
    for end in cuts:
        seq = next(s for e, s in seq_schedule(args, schedule) if end <= e)
        phases.append((start, end, seq, args.recur_last >= 0 and start >= switch))
        start = end
    return phases


def rate_points() -> list[tuple[float, float, str]]:
    """(training FLOPs per token, achieved FLOP/s per GPU, name) of each fitted log phase, ascending in FLOPs."""
    points = []
    for p in CALIBRATION:
        batch = Hyperparameters(p.env).train_batch_tokens
        points += [(f, f * batch / 8 / (ms / 1000), p.name) for _, _, _, ms, f in p.phases if p.fit]
    return sorted(points)


def achieved_rate(flops_token: float) -> tuple[float, str]:
    """The H100's achieved FLOP rate per GPU at a step of flops_token: interpolated in log FLOPs between the two
    fitted phases around it, the nearest one outside them."""
    points = rate_points()
    if flops_token <= points[0][0] or flops_token >= points[-1][0]:
        _, rate, name = points[0] if flops_token <= points[0][0] else points[-1]
        return rate, name
    (f0, r0, n0), (f1, r1, n1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= flops_token <= b[0])
    w = math.log(flops_token / f0) / math.log(f1 / f0)
    return r0 + w * (r1 - r0), f"{n0}..{n1}"


# Each evaluation path's seconds: name in train_gpt.EVAL_PATHS -> f(args, cost) where cost holds the last training
# phase's counted FLOPs per token (forward_token, flops_token, matmul_token, matmul_forward_token), its achieved
# rate, world_size, gpu and val_tokens. A path with no entry
# here makes the plan refuse (tests/test_plan.py checks the two registries agree).
def _batched_s(cost: dict, tokens: float) -> float:
    return tokens * cost["forward_token"] / (cost["world_size"] * cost["rate"] * PLAN_EVAL_EFFICIENCY["batched"])


def _roundtrip_s(args: Hyperparameters, cost: dict) -> float:
    # Plain scoring runs three times: the pre-quant and quantized diagnostics and the artifact's roundtrip.
    return 3 * _batched_s(cost, cost["val_tokens"] - 1)


def _sliding_s(args: Hyperparameters, cost: dict) -> float:
    seq = args.eval_seq_len
    return _batched_s(cost, len(tg.eval_windows(cost["val_tokens"] - 1, seq, args.eval_stride or seq)) * seq)


def _ttt_s(args: Hyperparameters, cost: dict) -> float:
    n, seq = cost["val_tokens"] - 1, args.eval_seq_len
    windows = len(tg.eval_windows(n, seq, args.eval_stride or seq)) * seq
    train = (-(-n // args.ttt_chunk_tokens) - 1) * args.ttt_chunk_tokens * args.ttt_epochs
    adaptive = cost["world_size"] * cost["rate"] * PLAN_EVAL_EFFICIENCY["adaptive"]
    return (windows * cost["forward_token"] + train * cost["flops_token"]) / adaptive


def _lora_s(args: Hyperparameters, cost: dict, batched: bool) -> tuple[float, list[float]]:
    # LoRA scoring: window tokens at the rate fitted on #1855/#2014 (scaled by forward matmul FLOPs), a latency a round.
    lengths = doc_lengths(PLAN_VAL_DOCS, cost["val_tokens"])
    tokens, rounds = lora_work(lengths, args.lora_slots, args.eval_seq_len, args.lora_chunk_tokens, cost["world_size"],
                               batched)
    scale = cost["matmul_forward_token"] / FIT_MATMUL_FORWARD * GPU_SPECS["H100"][1] / GPU_SPECS[cost["gpu"]][1]
    return tokens * LORA_TOKEN_S * scale + rounds * LORA_ROUND_S, lengths


def _lora_ttt_s(args: Hyperparameters, cost: dict) -> float:
    return _lora_s(args, cost, batched=False)[0]


def global_sgd_tokens(args: Hyperparameters, lengths: list[float]) -> float:
    """Tokens phased TTT's global SGD trains on: at each phase k, the longest prefix * k / phases documents."""
    prefix, phases = min(args.phased_ttt_prefix_docs, len(lengths)), args.phased_ttt_num_phases
    return sum(sum(lengths[len(lengths) - prefix * k // phases :]) for k in range(1, phases + 1)) * args.ttt_epochs


def _fit_global_token_s() -> float:
    # #1855's tttg lines: seconds of its global SGD over the tokens the plan counts for its settings (a latency-bound
    # step: 32K-token chunks on 8 GPUs, ~0.12 s each, 20x their FLOPs' time).
    p = CALIBRATION[2]
    return p.global_s / global_sgd_tokens(Hyperparameters(p.env), doc_lengths(PLAN_VAL_DOCS, PLAN_VAL_TOKENS[8192]))


GLOBAL_TOKEN_S = _fit_global_token_s()


def _phased_ttt_s(args: Hyperparameters, cost: dict) -> float:
    # LoRA scoring, then each phase's global SGD over the longest `boundary` documents, at #1855's seconds per token
    # (for another model, scaled by its training FLOPs).
    seconds, lengths = _lora_s(args, cost, batched=True)
    scale = cost["matmul_token"] / FIT_MATMUL_TRAIN * GPU_SPECS["H100"][1] / GPU_SPECS[cost["gpu"]][1]
    return seconds + global_sgd_tokens(args, lengths) * GLOBAL_TOKEN_S * scale


EVAL_COSTS = {"roundtrip": _roundtrip_s, "sliding_window": _sliding_s, "ttt": _ttt_s, "lora_ttt": _lora_ttt_s,
              "phased_ttt": _phased_ttt_s}


def project_eval_seconds(args: Hyperparameters, cost: dict) -> dict[str, float]:
    """Seconds of each evaluation path a run of args takes after training (train_gpt.EVAL_PATHS), by EVAL_COSTS."""
    taken = [name for name, path in tg.EVAL_PATHS.items() if path.enabled(args)]
    for name in taken:
        if name not in EVAL_COSTS:
            raise ConfigError(f"evaluation path {name!r} has no cost model: add it to EVAL_COSTS in records/plan.py")
    return {name: EVAL_COSTS[name](args, cost) for name in taken}


def val_tokens_of(args: Hyperparameters) -> int:
    # The split of the nearest known vocabulary (tokens per document fall as the vocabulary grows).
    return PLAN_VAL_TOKENS[min(PLAN_VAL_TOKENS, key=lambda v: abs(math.log(v / args.vocab_size)))]


def make_plan(args: Hyperparameters, world_size: int, gpu: str, code_bytes: int, val_tokens: int | None = None,
              schedule: str | None = None) -> dict:
    """The plan of a run of `args` on world_size GPUs of kind `gpu`: counts, projections and problems. schedule:
    a TRAIN_SEQ_SCHEDULE to plan (None: the settings')."""
    check_settings(args)
    memory_mib, peak_tflops = GPU_SPECS[gpu]
    val_tokens = val_tokens or val_tokens_of(args)
    accum = tg.grad_accum(args, world_size)
    budget_ms = tg.train_budget_ms(args)
    counted, phases = {}, []
    for start, end, seq, looped in train_phases(args, schedule):
        if args.train_batch_tokens % (world_size * accum * seq):
            raise ConfigError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a multiple of "
                              f"world_size({world_size}) x grad_accum_steps({accum}) x the sequence length ({seq})")
        micro_batch = args.train_batch_tokens // (world_size * accum * seq)
        if (seq, looped) not in counted:
            step_args = copy.copy(args)
            step_args.train_seq_len = seq
            counted[seq, looped] = count_train_step(step_args, micro_batch, args.plan_torch, looped)
        c = counted[seq, looped]
        rate, basis = achieved_rate(c["flops_token"])
        rate *= peak_tflops / GPU_SPECS["H100"][1]  # a roofline at the measured efficiency for other GPUs
        ms = c["flops_token"] * args.train_batch_tokens / world_size / rate * 1000
        phases.append({"start": start, "end": end, "seq": seq, "looped": looped, "micro_batch": micro_batch,
                       "ms_step": ms, "rate": rate, "basis": basis, "count": c})
    # Steps: each phase runs its share of the time budget at its own ms/step (of the steps without a budget).
    if budget_ms is None:
        for p in phases:
            p["steps"] = (p["end"] - p["start"]) * args.iterations
    else:
        for p in phases:
            p["steps"] = (p["end"] - p["start"]) * budget_ms / p["ms_step"]
    steps = min(args.iterations, int(sum(p["steps"] for p in phases)))
    ms_step = sum(p["steps"] * p["ms_step"] for p in phases) / sum(p["steps"] for p in phases)
    last = phases[-1]
    c = max((p["count"] for p in phases), key=lambda c: c["weights"] + c["grads"] + c["optimizer"] + c["activations"])
    # Memory at the start of the backward: weights, gradients (DDP's buckets, or accumulated), optimizer state, saved
    # activations of one micro-step; the costliest phase's.
    peak = c["weights"] + c["grads"] + c["optimizer"] + c["activations"]
    lc = last["count"]
    cost = {"forward_token": lc["forward_token"], "flops_token": lc["flops_token"], "matmul_token": lc["matmul_token"],
            "matmul_forward_token": lc["forward_token"] - lc["forward_attention_token"], "rate": last["rate"],
            "world_size": world_size, "val_tokens": val_tokens, "gpu": gpu}
    evals = project_eval_seconds(args, cost)
    model_bytes = estimate_model_bytes(args, c["state"])
    problems = []
    if peak / 2**20 > memory_mib:
        problems.append(f"over_memory peak:{peak / 2**20:.0f}MiB gpu:{memory_mib}MiB: lower TRAIN_BATCH_TOKENS per GPU "
                        f"(raise GRAD_ACCUM_STEPS) or shrink the model")
    if model_bytes + code_bytes > tg.SIZE_CAP_BYTES:
        problems.append(f"over_cap total_bytes:{model_bytes + code_bytes} cap:{tg.SIZE_CAP_BYTES}: fewer parameters or "
                        "fewer bits")
    if sum(evals.values()) > EVAL_LIMIT_SECONDS:
        problems.append(f"eval_over_time eval:{sum(evals.values()):.0f}s limit:{EVAL_LIMIT_SECONDS:.0f}s: "
                        f"switch off or shorten a path ({', '.join(evals)})")
    if args.warmdown_frac <= 0 and args.warmdown_iters >= steps:
        problems.append(f"warmdown_too_long warmdown_iters:{args.warmdown_iters} projected_steps:{steps}: "
                        f"set WARMDOWN_FRAC or fewer WARMDOWN_ITERS")
    return {**c, "flops_token": last["count"]["flops_token"], "world_size": world_size, "gpu": gpu,
            "peak_flops": peak_tflops * 1e12, "micro_batch": last["micro_batch"], "grad_accum": accum, "peak": peak,
            "memory_mib": memory_mib, "phases": phases, "ms_step": ms_step, "steps": steps, "evals": evals,
            "val_tokens": val_tokens, "model_bytes": model_bytes, "code_bytes": code_bytes, "problems": problems}


def check_settings(args: Hyperparameters) -> None:
    # The PLAN_* settings the planner reads (train_gpt.py stores them unchecked: a record run plans best-effort).
    if args.plan_gpu not in GPU_SPECS:
        raise ConfigError(f"PLAN_GPU={args.plan_gpu!r} is unknown; choose one of {sorted(GPU_SPECS)}")
    if not re.match(r"\d+\.\d+", args.plan_torch):
        raise ConfigError(f"PLAN_TORCH={args.plan_torch!r} must be a torch version such as 2.9")


def gpu_kind(device_name: str, default: str) -> str:
    # The GPU_SPECS entry a device name belongs to ("NVIDIA H100 80GB HBM3" -> H100); the PLAN_GPU target otherwise.
    return next((kind for kind in GPU_SPECS if kind in device_name), default)


def plan_lines(args: Hyperparameters, p: dict) -> list[str]:
    mib = lambda b: f"{b / 2**20:.0f}MiB"
    lines = [f"plan target:{p['world_size']}x{p['gpu']} torch_rules:{args.plan_torch} micro_batch:{p['micro_batch']}x"
             f"{p['phases'][-1]['seq']} grad_accum_steps:{p['grad_accum']}"]
    lines.append("plan params " + " ".join(f"{k}:{v}" for k, v in p["groups"].items()) + f" total:{sum(p['groups'].values())}")
    total = p["model_bytes"] + p["code_bytes"]
    lines.append(f"plan bytes model:{p['model_bytes']} code:{p['code_bytes']} total:{total} cap:{tg.SIZE_CAP_BYTES} "
                 f"headroom:{tg.SIZE_CAP_BYTES - total} quant:{args.quant_attn}/{args.quant_mlp}/{args.quant_embed}")
    lines.append(f"plan flops per_token:{p['flops_token']:.4g} matmul:{p['matmul_token']:.4g} attention:{p['attention_token']:.4g} "
                 f"forward:{p['forward_token']:.4g} per_step:{p['flops_token'] * args.train_batch_tokens:.4g}")
    lines.append(f"plan memory_per_gpu weights:{mib(p['weights'])} grads:{mib(p['grads'])} optimizer:{mib(p['optimizer'])} "
                 f"activations:{mib(p['activations'])} peak:{mib(p['peak'])} gpu:{p['memory_mib']}MiB "
                 f"headroom:{p['memory_mib'] - p['peak'] / 2**20:.0f}MiB")
    for ph in p["phases"]:
        lines.append(f"plan phase from:{ph['start']:.3f} to:{ph['end']:.3f} seq:{ph['seq']} looped:{int(ph['looped'])} "
                     f"flops_per_token:{ph['count']['flops_token']:.4g} ms_step:{ph['ms_step']:.2f} "
                     f"steps:{ph['steps']:.0f} achieved_tflops_per_gpu:{ph['rate'] / 1e12:.0f} basis:{ph['basis']}")
    lines.append(f"plan time ms_step:{p['ms_step']:.2f} steps:{p['steps']} tokens:{p['steps'] * args.train_batch_tokens}")
    lines.append(f"plan model_constants eval_efficiency_batched:{PLAN_EVAL_EFFICIENCY['batched']} "
                 f"eval_efficiency_adaptive:{PLAN_EVAL_EFFICIENCY['adaptive']} lora_token_us:{LORA_TOKEN_S * 1e6:.3f} "
                 f"lora_round_ms:{LORA_ROUND_S * 1e3:.1f} global_token_us:{GLOBAL_TOKEN_S * 1e6:.3f} "
                 f"compression_ratio:{PLAN_COMPRESSION_RATIO} val_tokens:{p['val_tokens']} (docs/plan.md)")
    lines.append("plan eval " + " ".join(f"{k}:{v:.0f}s" for k, v in p["evals"].items()) +
                 f" total:{sum(p['evals'].values()):.0f}s limit:{EVAL_LIMIT_SECONDS:.0f}s")
    lines.append("| what | predicted | limit |")
    lines.append("|---|---|---|")
    lines.append(f"| artifact bytes | {total:,} | {tg.SIZE_CAP_BYTES:,} |")
    lines.append(f"| peak MiB per GPU | {p['peak'] / 2**20:,.0f} | {p['memory_mib']:,} |")
    lines.append(f"| ms/step, steps | {p['ms_step']:.1f}, {p['steps']:,} | {args.max_wallclock_seconds:.0f} s |")
    lines.append(f"| eval seconds | {sum(p['evals'].values()):.0f} | {EVAL_LIMIT_SECONDS:.0f} |")
    lines += [f"problem:{text}" for text in p["problems"]]
    lines.append(f"plan_done problems:{len(p['problems'])}")
    return lines


def print_plan(args: Hyperparameters) -> int:
    """PLAN=1: print the plan for PLAN_WORLD_SIZE x PLAN_GPU; the exit status is 1 if it found a problem. Under
    torchrun one plan is enough: rank 0's."""
    if os.environ.get("RANK", "0") != "0":
        return 0
    code = tg.counted_code((tg.SCRIPT_DIR / "train_gpt.py").read_bytes(), args)
    plan = make_plan(args, args.plan_world_size, args.plan_gpu, len(code))
    print("\n".join(plan_lines(args, plan)))
    return 1 if plan["problems"] else 0


def calibration_rows(torch_version: str = "2.9") -> list[dict]:
    """The plan of each CALIBRATION log's settings on 8 H100s beside the logged figures: the planner's error per log
    (docs/plan.md's table; tests/test_plan.py bounds it)."""
    rows = []
    for p in CALIBRATION:
        args = Hyperparameters({**p.env, "PLAN_TORCH": torch_version})
        plan = make_plan(args, 8, "H100", 0, schedule=p.seq_schedule)
        evals = sum(plan["evals"][k] for k in p.eval_paths if k in plan["evals"])
        rows.append({"name": p.name, "fit": p.fit, "ms_step": (plan["ms_step"], p.ms_step),
                     "steps": (plan["steps"], p.steps),
                     "phase_ms": [(ph["ms_step"], logged[3]) for ph, logged in zip(plan["phases"], p.phases)],
                     "eval_s": (evals, p.eval_s), "model_bytes": (plan["model_bytes"], p.model_bytes),
                     "peak_mib": (plan["peak"] / 2**20, p.peak_mib)})
    return rows


if __name__ == "__main__":  # python3 records/plan.py: the calibration table (a few minutes of CPU)
    err = lambda pair: "n/a" if pair[1] is None else \
        f"{pair[0]:,.1f} vs {pair[1]:,} ({100 * (pair[0] / pair[1] - 1):+.1f}%)"
    for row in calibration_rows():
        print(f"{row['name']} ({'fit' if row['fit'] else 'held out'}): ms_step {err(row['ms_step'])}; steps "
              f"{err(row['steps'])}; phases " + ", ".join(f"{a:.1f} vs {b}" for a, b in row["phase_ms"]) +
              f"; eval_s {err(row['eval_s'])}; model_bytes {err(row['model_bytes'])}; peak_mib {err(row['peak_mib'])}")
