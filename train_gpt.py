"""Parameter Golf trainer: train, quantize, export and score a small LM under the 16 MB / 10 min rules.

Record run:  torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU smoke:   SMOKE=1 python3 train_gpt.py   (builds an embedded dataset if missing; no GPU, no network)
Every knob is an env var (README.md lists them); importing this file runs nothing.
"""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import random
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------
# HYPERPARAMETERS
# -----------------------------

SIZE_CAP_BYTES = 16_000_000
SCRIPT_DIR = Path(__file__).resolve().parent
# SMOKE=1 defaults: a tiny model on the embedded corpus, about two minutes on 2 CPU cores.
# Env vars set explicitly still win over these.
SMOKE_PRESET = {
    "DATA_PATH": str(SCRIPT_DIR / "data/datasets/smoke_sp1024"),
    "TOKENIZER_PATH": str(SCRIPT_DIR / "data/tokenizers/smoke_1024_bpe.model"),
    "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "VAL_BATCH_SIZE": "65536",
    "ITERATIONS": "200", "WARMDOWN_ITERS": "60", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "25", "MUON_MOMENTUM_WARMUP_STEPS": "50",
}


class ConfigError(Exception):
    """Bad input: main() prints it as one line naming the file or variable and the fix."""


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return raw == "1"


class Hyperparameters:
    """Every knob, read from the environment (or a mapping, for tests); `settings` holds the resolved values."""

    def __init__(self, env=None):
        env = dict(os.environ if env is None else env)
        if env.get("SMOKE") == "1":
            env = {**SMOKE_PRESET, **env}
        self.settings: dict[str, object] = {}
        cuda = torch.cuda.is_available()

        def get(name, default, cast=str):
            raw = env.get(name)
            try:
                value = default if raw is None else cast(raw)
            except ValueError as e:
                raise ConfigError(f"{name}={raw!r} is not a valid {cast.__name__.lstrip('_')} ({e}); fix or unset it")
            self.settings[name] = value
            return value

        # Data and run identity.
        self.smoke = get("SMOKE", False, _flag)
        self.data_path = get("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.train_files = os.path.join(self.data_path, "fineweb_train_*.bin")
        self.val_files = os.path.join(self.data_path, "fineweb_val_*.bin")
        self.tokenizer_path = get("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.run_id = get("RUN_ID", str(uuid.uuid4()))
        self.seed = get("SEED", 1337, int)
        self.token_loss_path = get("TOKEN_LOSS_PATH", "")

        # Validation cadence and batch size; validation always covers the whole val split.
        self.val_batch_size = get("VAL_BATCH_SIZE", 524_288, int)
        self.val_loss_every = get("VAL_LOSS_EVERY", 1000, int)
        self.train_log_every = get("TRAIN_LOG_EVERY", 200, int)

        # Training length and batch.
        self.iterations = get("ITERATIONS", 20000, int)
        self.warmdown_iters = get("WARMDOWN_ITERS", 1200, int)
        self.warmup_steps = get("WARMUP_STEPS", 20, int)
        self.train_batch_tokens = get("TRAIN_BATCH_TOKENS", 524_288, int)
        self.train_seq_len = get("TRAIN_SEQ_LEN", 1024, int)
        self.max_wallclock_seconds = get("MAX_WALLCLOCK_SECONDS", 600.0, float)
        self.grad_accum_steps = get("GRAD_ACCUM_STEPS", 0, int)  # 0: 8 // world_size, as the starter
        self.compile = get("COMPILE", cuda, _flag)

        # Model shape.
        self.model = get("MODEL", "gpt")
        self.vocab_size = get("VOCAB_SIZE", 1024, int)
        self.num_layers = get("NUM_LAYERS", 9, int)
        self.model_dim = get("MODEL_DIM", 512, int)
        self.num_heads = get("NUM_HEADS", 8, int)
        self.num_kv_heads = get("NUM_KV_HEADS", 4, int)
        self.mlp_mult = get("MLP_MULT", 2, int)
        self.tie_embeddings = get("TIE_EMBEDDINGS", True, _flag)
        self.rope_base = get("ROPE_BASE", 10000.0, float)
        self.logit_softcap = get("LOGIT_SOFTCAP", 30.0, float)
        self.qk_gain_init = get("QK_GAIN_INIT", 1.5, float)
        self.tied_embed_init_std = get("TIED_EMBED_INIT_STD", 0.005, float)

        # nGPT (MODEL=ngpt). alpha is stored as ALPHA_SCALE and used times ALPHA_INIT / ALPHA_SCALE (the paper's
        # reparametrization: a smaller scale makes Adam move alpha faster); its LRs are its own, GPT's stay put.
        self.ngpt_alpha_init = get("NGPT_ALPHA_INIT", 0.05, float)
        self.ngpt_alpha_scale = get("NGPT_ALPHA_SCALE", self.model_dim ** -0.5, float)
        self.ngpt_logit_scale_init = get("NGPT_LOGIT_SCALE_INIT", 1.0, float)
        self.ngpt_norm_embed = get("NGPT_NORM_EMBED", False, _flag)
        self.ngpt_opaque_norm = get("NGPT_OPAQUE_NORM", True, _flag)
        self.ngpt_matrix_lr = get("NGPT_MATRIX_LR", 0.04, float)
        self.ngpt_embed_lr = get("NGPT_EMBED_LR", 0.05, float)
        self.ngpt_head_lr = get("NGPT_HEAD_LR", 0.008, float)
        self.ngpt_scalar_lr = get("NGPT_SCALAR_LR", 0.04, float)

        # Optimizers.
        self.embed_lr = get("EMBED_LR", 0.6, float)
        self.head_lr = get("HEAD_LR", 0.008, float)
        self.tied_embed_lr = get("TIED_EMBED_LR", 0.05, float)
        self.matrix_lr = get("MATRIX_LR", 0.04, float)
        self.scalar_lr = get("SCALAR_LR", 0.04, float)
        self.muon_momentum = get("MUON_MOMENTUM", 0.95, float)
        self.muon_backend_steps = get("MUON_BACKEND_STEPS", 5, int)
        self.muon_momentum_warmup_start = get("MUON_MOMENTUM_WARMUP_START", 0.85, float)
        self.muon_momentum_warmup_steps = get("MUON_MOMENTUM_WARMUP_STEPS", 500, int)
        self.beta1 = get("BETA1", 0.9, float)
        self.beta2 = get("BETA2", 0.95, float)
        self.adam_eps = get("ADAM_EPS", 1e-8, float)
        self.grad_clip_norm = get("GRAD_CLIP_NORM", 0.0, float)

        # Export.
        self.quant = get("QUANT", "int8")
        self.compressor = get("COMPRESSOR", "zlib")
        self.artifact_path = get("ARTIFACT_PATH", f"final_model.{self.quant}.ptz")
        self.validate()

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"MODEL={self.model!r} is unknown; choose one of {sorted(MODELS)}")
        if self.quant not in QUANT_BITS:
            raise ConfigError(f"QUANT={self.quant!r} is unknown; choose one of {sorted(QUANT_BITS)}")
        if self.compressor not in COMPRESSORS:
            raise ConfigError(f"COMPRESSOR={self.compressor!r} is unknown; choose one of {sorted(COMPRESSORS)}")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"MODEL_DIM={self.model_dim} must split into NUM_HEADS={self.num_heads} heads of even size")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads} must be a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        if self.logit_softcap <= 0:
            raise ConfigError(f"LOGIT_SOFTCAP={self.logit_softcap} must be positive")
        if self.ngpt_alpha_scale <= 0:
            raise ConfigError(f"NGPT_ALPHA_SCALE={self.ngpt_alpha_scale} must be positive")

    def misspellings(self, env=None) -> list[str]:
        """Env vars that look like a mistyped setting name, with the likely intended name."""
        env = os.environ if env is None else env
        out = []
        for key in sorted(env):
            if key in self.settings or not key.isupper():
                continue
            close = difflib.get_close_matches(key, list(self.settings), n=1, cutoff=0.85)
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
        raise ConfigError(
            f"no {split} shards match {pattern}: download them with "
            "`python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80`, "
            "point DATA_PATH at a folder of fineweb_*.bin shards, or run with SMOKE=1 for the offline smoke dataset"
        )
    for f in files:
        shard_token_count(f)
    return files


def load_validation_tokens(pattern: str, vocab_size: int | None = None, seq_len: int = 1) -> Tensor:
    """All val tokens, every shard in sorted order: the whole split is scored."""
    tokens = torch.cat([load_data_shard(f, vocab_size) for f in shard_files(pattern, "val")]).contiguous()
    if tokens.numel() - 1 < seq_len:
        raise ConfigError(f"val split {pattern} has {tokens.numel()} tokens, fewer than TRAIN_SEQ_LEN+1={seq_len + 1}: "
                          "use a longer val split or a shorter TRAIN_SEQ_LEN")
    return tokens


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
    def __init__(self, pattern: str, vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(pattern, vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(dtype=torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# -----------------------------
# MODEL
# -----------------------------
# A model class takes Hyperparameters, returns per-token losses (B, T) from
# forward(input_ids, target_ids, isolate_docs=False) (isolate_docs: attention never crosses a BOS),
# sorts its parameters for the optimizers in param_groups() at the rates of learning_rates(args), and may hook
# after_optimizer_step() and after_dequantize() (a sphere-constrained model renormalizes there; any code that
# steps an optimizer on it, test-time training included, calls after_optimizer_step()).
# MODELS maps MODEL=<name> to the class.

# Small tensors that act as gains or mixes: kept in fp32, optimized by Adam, never quantized.
CONTROL_TENSOR_NAME_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights",
                                "attn_alpha", "mlp_alpha", "s_qk", "s_uv", "s_z")


class CastedLinear(nn.Linear):
    # fp32 weights for the optimizer, cast to the activation dtype at matmul time.
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), persistent=False)
        self._cache: tuple[int, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1].device != device:
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (seq_len, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[1].to(dtype), self._cache[2].to(dtype)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, input_ids: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Causal SDPA over (B, H, T, D), softmax scale `scale` (None: 1/sqrt(D)); given input_ids, a token attends
    only within its own document (each BOS starts one), so no context crosses a document boundary."""
    gqa = q.size(1) != k.size(1)
    if input_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    doc = (input_ids == BOS_ID).cumsum(1)
    causal = torch.ones(q.size(2), q.size(2), dtype=torch.bool, device=q.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Hyperparameters):
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
        self.rotary = Rotary(self.head_dim, args.rope_base)
        self.softmax_scale = None

    def forward(self, x: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.position_qk(q, k, *self.rotary(T, x.device, q.dtype))
        y = causal_attention(q, k, v, doc_ids, self.softmax_scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def position_qk(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        # QK-norm, then RoPE, then a learnable per-head gain sets the attention temperature.
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        return q * self.q_gain.to(q.dtype)[None, :, None, None], k


class MLP(nn.Module):
    # relu^2 MLP (modded-nanogpt).
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(args.model_dim, args.mlp_mult * args.model_dim, bias=False)
        self.proj = CastedLinear(args.mlp_mult * args.model_dim, args.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        self.attn = CausalSelfAttention(args)
        self.mlp = MLP(args)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Learned mix of the running stream with the embedding stream x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (x.size(-1),)), doc_ids)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (x.size(-1),)))


class GPT(nn.Module):
    """The challenge starter's baseline: U-Net skips over a stack of pre-norm blocks, tied embeddings, softcap."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.logit_softcap = args.logit_softcap
        self.tok_emb = nn.Embedding(args.vocab_size, args.model_dim)
        self.num_encoder_layers = args.num_layers // 2
        self.num_decoder_layers = args.num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), args.model_dim))
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.lm_head = None if args.tie_embeddings else CastedLinear(args.model_dim, args.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if args.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        for m in self.modules():
            if getattr(m, "_zero_init", False):
                nn.init.zeros_(m.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, isolate_docs: bool = False) -> Tensor:
        doc_ids = input_ids if isolate_docs else None
        x = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        x0, skips = x, []
        # The first half stores skips; the second half adds them back in reverse order.
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0, doc_ids)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers :]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0, doc_ids)
        x = F.rms_norm(x, (x.size(-1),))
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        logits = self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """matrix -> Muon; embed, head, scalar -> Adam with their own learning rates."""
        groups = {"matrix": [], "embed": [self.tok_emb.weight], "head": [], "scalar": [self.skip_weights]}
        for name, p in self.blocks.named_parameters():
            is_control = p.ndim < 2 or any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS)
            groups["scalar" if is_control else "matrix"].append(p)
        if self.lm_head is not None:
            groups["head"].append(self.lm_head.weight)
        return groups

    def learning_rates(self, args: Hyperparameters) -> dict[str, float]:
        return {"matrix": args.matrix_lr, "embed": args.tied_embed_lr if args.tie_embeddings else args.embed_lr,
                "head": args.head_lr, "scalar": args.scalar_lr}

    def after_optimizer_step(self) -> None:
        pass

    def after_dequantize(self) -> None:
        pass


class _SphereNormalize(torch.autograd.Function):
    # x / |x| over the last axis in (at least) fp32, returned in fp32, so the stream is never rounded to bf16 between
    # normalizations; with allow_in_graph it is one opaque node in Dynamo's graph with this hand-written backward,
    # not ops the compiler re-fuses across casts, where bf16 error compounded over ~80 normalizations (seed 000).
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
    def __init__(self, args: Hyperparameters):
        super().__init__(args)
        del self.q_gain
        for m in (self.c_q, self.c_k, self.c_v):
            m._sphere_dim = 1
        self.proj._sphere_dim = 0
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
    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        self.attn = NGPTAttention(args)
        self.mlp = NGPTMLP(args)
        self.norm = self.attn.norm
        self.attn_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_scale))
        self.mlp_alpha = nn.Parameter(torch.full((dim,), args.ngpt_alpha_scale))
        self.alpha_gain = args.ngpt_alpha_init / args.ngpt_alpha_scale

    def forward(self, h: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        # A step of size |alpha| (per dimension) from h toward the block's normalized output, back onto the sphere.
        h = self.norm(h + (self.attn_alpha * self.alpha_gain).abs() * (self.norm(self.attn(h, doc_ids)) - h))
        return self.norm(h + (self.mlp_alpha * self.alpha_gain).abs() * (self.norm(self.mlp(h)) - h))


class NGPT(nn.Module):
    """nGPT (Loshchilov et al., arXiv 2410.01131): hidden states and matrices on the unit sphere, no norm layers,
    learned step sizes alpha, logits scaled per vocabulary entry by s_z. The 16 MB fixes (seed 000): no
    zero-initialized projections, a learnable logit scale, and (NGPT_NORM_EMBED=0) a free token embedding."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        if args.ngpt_norm_embed:
            self.tok_emb._sphere_dim = 1
        self.blocks = nn.ModuleList(NGPTBlock(args) for _ in range(args.num_layers))
        self.norm = self.blocks[0].norm
        self.lm_head = None if args.tie_embeddings else sphere_linear(dim, args.vocab_size, 1)
        self.s_z = nn.Parameter(torch.full((args.vocab_size,), dim ** -0.5))
        self.s_z_gain = args.ngpt_logit_scale_init * dim ** 0.5
        # Random unit rows (or columns) everywhere; a free embedding starts with unit rows too.
        for m in self.modules():
            if isinstance(m, (CastedLinear, nn.Embedding)):
                nn.init.normal_(m.weight)
                m.weight.data = F.normalize(m.weight.data, dim=getattr(m, "_sphere_dim", 1))

    def forward(self, input_ids: Tensor, target_ids: Tensor, isolate_docs: bool = False) -> Tensor:
        doc_ids = input_ids if isolate_docs else None
        h = self.norm(self.tok_emb(input_ids))
        for block in self.blocks:
            h = block(h, doc_ids)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = (self.s_z * self.s_z_gain) * F.linear(h, w.to(h.dtype)).float()
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Sphere matrices -> Muon (then projected); embedding, head, alpha, s_qk, s_uv, s_z -> Adam."""
        groups = {"matrix": [], "embed": [self.tok_emb.weight], "head": [], "scalar": [self.s_z]}
        for p in self.blocks.parameters():
            groups["matrix" if p.ndim == 2 else "scalar"].append(p)
        if self.lm_head is not None:
            groups["head"].append(self.lm_head.weight)
        return groups

    def learning_rates(self, args: Hyperparameters) -> dict[str, float]:
        return {"matrix": args.ngpt_matrix_lr, "embed": args.ngpt_embed_lr, "head": args.ngpt_head_lr,
                "scalar": args.ngpt_scalar_lr}

    @torch.no_grad()
    def project_to_sphere(self) -> None:
        """Unit norm, in fp32, along each constrained matrix's declared axis; a free embedding and control
        tensors are never touched. Weight decay on these matrices would be undone here, so none applies."""
        for m in self.modules():
            if hasattr(m, "_sphere_dim"):
                m.weight.copy_(F.normalize(m.weight.float(), dim=m._sphere_dim))

    # After Muon/Adam (or a TTT step) and after dequantization, which leaves rows off the sphere.
    after_optimizer_step = after_dequantize = project_to_sphere


MODELS = {"gpt": GPT, "ngpt": NGPT}


def build_model(args: Hyperparameters, device: torch.device) -> nn.Module:
    model = MODELS[args.model](args).to(device)
    if device.type == "cuda":
        # The starter's precision layout: bf16 body, fp32 linear weights and control tensors.
        model.bfloat16()
        for name, p in model.named_parameters():
            if isinstance(p, nn.Parameter) and (p.ndim < 2 or any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS)):
                p.data = p.data.float()
        for m in model.modules():
            if isinstance(m, CastedLinear):
                m.float()
    return model


# -----------------------------
# OPTIMIZERS
# -----------------------------

def zeropower_via_newtonschulz5(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    # Quintic Newton-Schulz iteration toward the nearest semi-orthogonal matrix (modded-nanogpt);
    # bf16 on GPU for speed, fp32 on CPU where bf16 matmuls are slow.
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Muon: orthogonalized Nesterov momentum; each rank orthogonalizes every world_size-th matrix,
    then one all-reduce shares the updates."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = zeropower_via_newtonschulz5(p.grad.add(buf, alpha=group["momentum"]), group["backend_steps"])
                    g = g * max(1, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(args: Hyperparameters, model: nn.Module) -> tuple[list[torch.optim.Optimizer], Muon]:
    groups, lrs = model.param_groups(), model.learning_rates(args)
    fused = next(model.parameters()).is_cuda

    def adam(name):
        return torch.optim.Adam([{"params": groups[name], "lr": lrs[name], "base_lr": lrs[name]}],
                                betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)

    muon = Muon(groups["matrix"], lr=lrs["matrix"], momentum=args.muon_momentum, backend_steps=args.muon_backend_steps)
    for g in muon.param_groups:
        g["base_lr"] = lrs["matrix"]
    optimizers = [adam("embed"), muon, adam("scalar")]
    if groups["head"]:
        optimizers.insert(1, adam("head"))
    return optimizers, muon


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    # Linear warmdown over the last WARMDOWN_ITERS steps; under a wallclock cap the remaining steps are
    # projected from the average step time so far, so the decay ends when time does.
    if args.warmdown_iters <= 0:
        return 1.0
    if args.max_wallclock_seconds <= 0:
        start = max(args.iterations - args.warmdown_iters, 0)
        return max((args.iterations - step) / args.warmdown_iters, 0.0) if step >= start else 1.0
    warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(1000.0 * args.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


# -----------------------------
# QUANTIZATION AND EXPORT
# -----------------------------
# Artifact = MAGIC + compressor name + compressed(payload); payload = 4-byte manifest length + JSON manifest
# (format version, settings, tensor table) + raw tensor bytes. It loads with the requirements alone.

ARTIFACT_MAGIC = b"PGOLF1"
ARTIFACT_VERSION = 1
QUANT_BITS = {"int8": 8, "int6": 6}
QUANT_CLIP_Q = 0.9999984  # the starter's per-row clipping percentile
KEEP_FLOAT_MAX_NUMEL = 65_536


def _zstd():
    import zstandard

    return zstandard


COMPRESSORS = {
    "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "zstd": (lambda b: _zstd().ZstdCompressor(level=22).compress(b), lambda b: _zstd().ZstdDecompressor().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
}


def quantize_per_row(t: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization with percentile clipping; returns int8 codes and fp16 row scales."""
    qmax = 2 ** (bits - 1) - 1
    t32 = t.float()
    clip = torch.quantile(t32.abs(), QUANT_CLIP_Q, dim=1)
    # Quantize with the fp16-rounded scale that will be stored, so dequantization sees the same grid.
    scale = (clip / qmax).clamp_min(1e-7).to(torch.float16)
    q = torch.clamp(torch.round(t32.clamp(-clip[:, None], clip[:, None]) / scale.float()[:, None]), -qmax, qmax)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def quantize_state_dict(state_dict: dict[str, Tensor], bits: int) -> dict[str, dict]:
    """Matrices -> per-row int codes; small and control tensors stay float (fp32 control, fp16 others)."""
    out = {}
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        if t.is_floating_point() and t.ndim == 2 and t.numel() > KEEP_FLOAT_MAX_NUMEL \
                and not any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS):
            q, s = quantize_per_row(t, bits)
            out[name] = {"q": q, "scale": s, "dtype": str(t.dtype).removeprefix("torch.")}
        elif t.is_floating_point():
            keep = torch.float32 if any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS) else torch.float16
            out[name] = {"w": t.to(keep), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            out[name] = {"w": t, "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def dequantize_state_dict(qsd: dict[str, dict]) -> dict[str, Tensor]:
    out = {}
    for name, e in qsd.items():
        dtype = getattr(torch, e["dtype"])
        if "q" in e:
            out[name] = (e["q"].float() * e["scale"].float()[:, None]).to(dtype)
        else:
            out[name] = e["w"].to(dtype)
    return out


def pack_artifact(qsd: dict[str, dict], settings: dict, compressor: str) -> bytes:
    table, chunks, offset = [], [], 0
    for name, e in qsd.items():
        for part, t in e.items():
            if part == "dtype":
                continue
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            table.append([name, part, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(raw)])
            chunks.append(raw)
            offset += len(raw)
    manifest = json.dumps({"version": ARTIFACT_VERSION, "settings": settings, "tensors": table,
                           "dtypes": {n: e["dtype"] for n, e in qsd.items()}}, separators=(",", ":")).encode()
    payload = len(manifest).to_bytes(4, "little") + manifest + b"".join(chunks)
    name = compressor.encode()
    return ARTIFACT_MAGIC + bytes([len(name)]) + name + COMPRESSORS[compressor][0](payload)


def unpack_artifact(blob: bytes, source: str = "artifact") -> tuple[dict[str, dict], dict]:
    """Inverse of pack_artifact: (quantized state dict, settings the model was built with)."""
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ConfigError(f"{source}: not a Parameter Golf artifact (bad magic); give a file written by train_gpt.py")
    n = blob[len(ARTIFACT_MAGIC)]
    compressor = blob[len(ARTIFACT_MAGIC) + 1 : len(ARTIFACT_MAGIC) + 1 + n].decode()
    if compressor not in COMPRESSORS:
        raise ConfigError(f"{source}: unknown compressor {compressor!r}; use a train_gpt.py that knows it")
    payload = COMPRESSORS[compressor][1](blob[len(ARTIFACT_MAGIC) + 1 + n :])
    mlen = int.from_bytes(payload[:4], "little")
    manifest = json.loads(payload[4 : 4 + mlen])
    if manifest["version"] != ARTIFACT_VERSION:
        raise ConfigError(f"{source}: artifact format version {manifest['version']}, this script reads {ARTIFACT_VERSION}")
    data = memoryview(payload)[4 + mlen :]
    qsd = {name: {"dtype": dtype} for name, dtype in manifest["dtypes"].items()}
    for name, part, dtype, shape, offset, size in manifest["tensors"]:
        raw = torch.frombuffer(bytearray(data[offset : offset + size]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        qsd[name][part] = raw.view(getattr(torch, dtype)).reshape(shape)
    return qsd, manifest["settings"]


def model_from_artifact(blob: bytes, device: torch.device, source: str = "artifact") -> tuple[nn.Module, Hyperparameters]:
    """A fresh model built from the settings stored in the artifact, loaded with its dequantized weights."""
    qsd, settings = unpack_artifact(blob, source)
    args = Hyperparameters({k: str(int(v) if isinstance(v, bool) else v) for k, v in settings.items()})
    model = build_model(args, device)
    model.load_state_dict(dequantize_state_dict(qsd), strict=True)
    model.after_dequantize()
    return model, args


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


def evaluate(args, model, val_tokens, luts, rank, world_size, device, *, stride=None, collect=False, label="val"):
    """Score every val target once. Returns (val_loss, val_bpb, per-target losses or None); totals are exact
    sums over ranks. Windows are batched at a fixed shape so compiled graphs are reused."""
    seq_len = args.train_seq_len
    num_targets = val_tokens.numel() - 1
    windows = eval_windows(num_targets, seq_len, stride or seq_len)
    mine = windows[len(windows) * rank // world_size : len(windows) * (rank + 1) // world_size]
    # Windows per batch per rank, sized like a training micro-batch.
    batch = max(1, args.val_batch_size // (world_size * grad_accum(args, world_size) * seq_len))
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    byte_sum = torch.zeros((), device=device, dtype=torch.float64)
    losses = torch.zeros(num_targets, device=device, dtype=torch.float32) if collect else None
    offsets = torch.arange(seq_len, device=device)
    t0, next_report = time.perf_counter(), 0.1
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(mine), batch):
            chunk = mine[b : b + batch]
            pad = batch - len(chunk)
            starts = torch.tensor([s for s, _ in chunk] + [chunk[0][0]] * pad, device=device)
            first = torch.tensor([f for _, f in chunk] + [seq_len] * pad, device=device)
            idx = starts[:, None] + offsets
            x, y = tokens[idx], tokens[idx + 1]
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tok_loss = model(x, y).float()
            mask = offsets[None, :] >= first[:, None]
            loss_sum += tok_loss[mask].double().sum()
            byte_sum += count_target_bytes(x, y, luts)[mask].double().sum()
            if collect:
                losses[idx[mask]] = tok_loss[mask]
            done = (b + len(chunk)) / max(len(mine), 1)
            if rank == 0 and done >= next_report:
                print(f"eval:{label} {done:.0%} windows:{b + len(chunk)}/{len(mine)} time:{time.perf_counter() - t0:.0f}s", flush=True)
                next_report += 0.1
    if dist.is_available() and dist.is_initialized():
        for t in (loss_sum, byte_sum) + ((losses,) if collect else ()):
            dist.all_reduce(t)
    model.train()
    val_loss = loss_sum.item() / num_targets
    return val_loss, val_loss / math.log(2.0) * num_targets / byte_sum.item(), losses


# -----------------------------
# MAIN
# -----------------------------

def grad_accum(args: Hyperparameters, world_size: int) -> int:
    # GRAD_ACCUM_STEPS=0 keeps the starter's 8 // world_size, so the global batch is the same on 1 to 8 GPUs.
    return args.grad_accum_steps or max(1, 8 // world_size)


def ensure_smoke_data(args: Hyperparameters, master: bool) -> None:
    """SMOKE=1 builds the embedded dataset and tokenizer once, if they are missing (rank 0 builds, others wait)."""
    if not args.smoke or (glob.glob(args.train_files) and Path(args.tokenizer_path).is_file()):
        return
    if master:
        cmd = [sys.executable, str(SCRIPT_DIR / "data/build_shards.py"), "--embedded", "--out-dir", args.data_path,
               "--train-tokenizer", args.tokenizer_path, "--vocab-size", str(args.vocab_size)]
        print("smoke: building the embedded dataset: " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise ConfigError("smoke: data/build_shards.py failed (see above); fix it or set DATA_PATH and TOKENIZER_PATH")
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    code_path = Path(__file__).resolve()
    code_bytes = code_path.read_bytes()
    args = Hyperparameters()

    # Distributed setup: torchrun's env vars, with defaults so plain python3 works.
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master = rank == 0
    grad_accum_steps = grad_accum(args, world_size)
    micro_tokens = args.train_batch_tokens // (world_size * grad_accum_steps)
    if args.train_batch_tokens % (world_size * grad_accum_steps * args.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a multiple of world_size({world_size}) x "
                          f"grad_accum_steps({grad_accum_steps}) x TRAIN_SEQ_LEN({args.train_seq_len})")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        from torch.backends.cuda import enable_cudnn_sdp, enable_flash_sdp, enable_math_sdp, enable_mem_efficient_sdp

        # Flash attention serves the plain causal path; masked (document-isolated) attention needs the others.
        enable_cudnn_sdp(False), enable_flash_sdp(True), enable_mem_efficient_sdp(True), enable_math_sdp(True)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        dist.barrier()

    logfile = None
    if master:
        os.makedirs("logs", exist_ok=True)
        logfile = open(f"logs/{args.run_id}.txt", "a", encoding="utf-8")
        print(f"logs/{args.run_id}.txt")

    def log0(msg: str, console: bool = True) -> None:
        if master:
            if console:
                print(msg, flush=True)
            logfile.write(msg + "\n")
            logfile.flush()

    # The log is a full record: settings, overrides, code, versions, hardware.
    log0(f"run_id:{args.run_id}")
    for name in sorted(args.settings):
        log0(f"setting:{name}={args.settings[name]}")
    for name in sorted(args.settings):
        if name in os.environ:
            log0(f"env:{name}={os.environ[name]}")
    for w in args.misspellings():
        log0(f"warning:{w}")
    log0(f"code_sha256:{hashlib.sha256(code_bytes).hexdigest()} code_bytes:{len(code_bytes)} code_path:{code_path}")
    log0(f"versions python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
         f"sentencepiece:{spm.__version__}")
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU({os.cpu_count()} cores)"
    log0(f"hardware:{world_size}x{hw} world_size:{world_size} grad_accum_steps:{grad_accum_steps}")
    log0("source_begin", console=False)
    log0(code_bytes.decode("utf-8").removesuffix("\n"), console=False)
    log0("source_end", console=False)

    # Seeds, data, tokenizer.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    ensure_smoke_data(args, master)
    sp = load_tokenizer(args)
    luts = build_sentencepiece_luts(sp, args.vocab_size, device)
    val_tokens = load_validation_tokens(args.val_files, args.vocab_size, args.train_seq_len).to(device, torch.int64)
    train_loader = DistributedTokenLoader(args.train_files, args.vocab_size, rank, world_size, device)
    log0(f"train_loader:dataset:{Path(args.data_path).resolve().name} train_shards:{len(train_loader.stream.files)}")
    log0(f"val_loader:shards pattern={args.val_files} tokens:{val_tokens.numel()}")

    # Model and optimizers.
    base_model = build_model(args, device)
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if args.compile else base_model
    if distributed:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizers, muon = build_optimizers(args, base_model)
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())}")

    def train_step(step: int, lr_scale: float) -> Tensor:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        train_loss = torch.zeros((), device=device)
        for micro in range(grad_accum_steps):
            if distributed:
                model.require_backward_grad_sync = micro == grad_accum_steps - 1
            x, y = train_loader.next_batch(args.train_batch_tokens, args.train_seq_len, grad_accum_steps)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(x, y).mean()
            train_loss += loss.detach()
            (loss / grad_accum_steps).backward()
        frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
        for g in muon.param_groups:
            g["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        base_model.after_optimizer_step()
        return train_loss / grad_accum_steps

    # Warm-up steps compile every graph, then weights, optimizer state and data position are restored.
    if args.warmup_steps > 0:
        if args.compile:
            log0("compiling: warm-up steps run the compiled graphs once, then everything is restored")
        model_state = copy.deepcopy(base_model.state_dict())
        opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        for i in range(args.warmup_steps):
            train_step(0, 1.0)
            log0(f"warmup_step:{i + 1}/{args.warmup_steps}")
        base_model.load_state_dict(model_state)
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        train_loader = DistributedTokenLoader(args.train_files, args.vocab_size, rank, world_size, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Training loop: the clock pauses during validation; the wallclock stop is agreed by all ranks.
    max_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None
    train_ms, stop_after, step = 0.0, None, 0
    sync()
    t0 = time.perf_counter()
    while True:
        last = step == args.iterations or (stop_after is not None and step >= stop_after)
        if last or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            sync()
            train_ms += 1000.0 * (time.perf_counter() - t0)
            eval_t0 = time.perf_counter()
            vl, vb, _ = evaluate(args, model, val_tokens, luts, rank, world_size, device, label=f"step{step}")
            log0(f"step:{step}/{args.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} "
                 f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last:
            if stop_after is not None and step < args.iterations:
                log0(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{args.iterations}")
            break
        elapsed = train_ms + 1000.0 * (time.perf_counter() - t0)
        train_loss = train_step(step, lr_multiplier(args, step, elapsed))
        step += 1
        approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop_after is not None):
            if distributed:  # log the global batch's loss, not rank 0's share
                dist.all_reduce(train_loss)
                train_loss /= world_size
            log0(f"step:{step}/{args.iterations} train_loss:{train_loss.item():.4f} "
                 f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms")
        reached = max_ms is not None and approx_ms >= max_ms
        if distributed and max_ms is not None:
            flag = torch.tensor(int(reached), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reached = bool(flag.item())
        if stop_after is None and reached:
            stop_after = step
    log0(f"train_done steps:{step} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
    if device.type == "cuda":
        log0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
             f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")

    # Evaluation and export (eval_t0: the last validation above, the pre-quant score, opened the eval phase).
    # Every path prints final_<what>; the submission's score is printed last.
    results = []

    def report(what: str, vl: float, vb: float, ms: float) -> None:
        log0(f"final_{what} val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_time:{ms:.0f}ms")
        log0(f"final_{what}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")
        results.append((what, vl, vb))

    def score(what: str, net: nn.Module, collect: bool = False):
        sync()
        t = time.perf_counter()
        vl, vb, losses = evaluate(args, net, val_tokens, luts, rank, world_size, device, collect=collect, label=what)
        sync()
        report(what, vl, vb, 1000.0 * (time.perf_counter() - t))
        return losses

    report("prequant", vl, vb, 1000.0 * (t0 - eval_t0))
    fmt = f"{args.quant}_{args.compressor}"
    blob = pack_artifact(quantize_state_dict(base_model.state_dict(), QUANT_BITS[args.quant]), args.settings, args.compressor)
    total_bytes = len(blob) + len(code_bytes)
    under_cap = total_bytes <= SIZE_CAP_BYTES
    if master:
        Path(args.artifact_path).write_bytes(blob)
    log0(f"Serialized model {args.quant}+{args.compressor}: {len(blob)} bytes")
    log0(f"Code size: {len(code_bytes)} bytes")
    log0(f"Total submission size {args.quant}+{args.compressor}: {total_bytes} bytes")
    log0(f"artifact:{args.artifact_path} format:{fmt} model_bytes:{len(blob)} code_bytes:{len(code_bytes)} "
         f"total_bytes:{total_bytes} cap:{SIZE_CAP_BYTES} under_cap:{int(under_cap)}")
    if not under_cap:
        log0(f"WARNING: total submission size {total_bytes} bytes is OVER the {SIZE_CAP_BYTES}-byte cap "
             f"by {total_bytes - SIZE_CAP_BYTES} bytes: this artifact is not a valid submission")
    if distributed:
        dist.barrier()
    # The roundtrip: a fresh model built from the file on disk alone.
    fresh, _ = model_from_artifact(Path(args.artifact_path).read_bytes(), device, args.artifact_path)
    fresh_model = torch.compile(fresh, dynamic=False, fullgraph=True) if args.compile else fresh
    losses = score(f"{fmt}_roundtrip", fresh_model, collect=bool(args.token_loss_path))
    if args.token_loss_path and master:
        np.save(args.token_loss_path, losses.cpu().numpy())
        log0(f"token_losses:{args.token_loss_path} count:{losses.numel()}")

    what, vl, vb = results[-1]
    eval_ms = 1000.0 * (time.perf_counter() - eval_t0)
    log0(f"submission score:{what} val_loss:{vl:.8f} val_bpb:{vb:.8f} total_bytes:{total_bytes} "
         f"under_cap:{int(under_cap)} train_time:{train_ms:.0f}ms eval_time:{eval_ms:.0f}ms")
    if not under_cap:
        log0(f"WARNING: OVER THE {SIZE_CAP_BYTES}-BYTE CAP ({total_bytes} bytes)")
    log0(f"final_{what}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
