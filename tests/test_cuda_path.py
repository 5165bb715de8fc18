"""The CUDA path traced without a GPU. On a CUDA build of torch, FakeTensorMode makes CUDA tensors that carry
device, dtype and shape but no data, so the full-size model is built with build_model's CUDA layout, its training
forward runs under bf16 autocast with the attention kernel a GPU run calls, its backward runs from a make_fx trace
replayed on fake CPU tensors, the optimizers step, and torch.compile traces the forward as one graph: a device,
dtype, shape or graph-break error in a CUDA-only branch fails here, in CI, not on the first GPU run."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.varlen import varlen_attn
from torch.overrides import TorchFunctionMode

import train_gpt as tg

pytestmark = pytest.mark.skipif(torch.version.cuda is None,
                                reason="fake CUDA tensors need a CUDA build of torch (the CI installs one)")

CUDA = torch.device("cuda", 0)
# The default (the recipe, its loop not yet on), nGPT, and the loop on.
CASES = {"gpt": {}, "ngpt": {"MODEL": "ngpt"}, "gpt_recurrence": {"RECUR_START_FRAC": "0"}}


@pytest.fixture
def fake_cuda(monkeypatch):
    # torch.autocast("cuda") switches itself off (with a warning) when no GPU is present: keep it on.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    # build_model picks the attention kernel of the GPU it finds; here, an H100's (sm90, no FA3 installed).
    monkeypatch.setattr(tg, "attention_support", lambda device: (9, False) if device.type == "cuda" else (0, False))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with FakeTensorMode() as mode:
        # The converter memoizes new fake tensors through weak references, and Module.to() cannot swap a tensor
        # that has one ("Cannot swap t1 because it has weakref associated with it"): build_model would fail.
        mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
        yield mode


class GpuAttention(TorchFunctionMode):
    """SDPA as a GPU run dispatches it (main enables the flash kernel first): causal attention without a mask goes to
    the flash kernel, with its input checks. On fake CUDA tensors SDPA itself would pick the math kernel. With
    DOC_ATTENTION=1 attention goes to varlen_attn instead (packed documents, fake kernel registered): counted too."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls = 0
        monkeypatch.setattr(tg, "varlen_attn", self.varlen)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
        assert q.dim() == 3 and q.size(-1) <= 256 and q.size(-1) % 8 == 0 and q.size(1) % k.size(1) == 0
        assert cu_q.dtype == torch.int32 and cu_q.is_cuda and kw["window_size"] == (-1, 0)
        if not torch.compiler.is_compiling():  # Dynamo refuses a counter mutated inside torch.cond's branches
            self.calls += 1
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or kwargs.get("attn_mask") is not None:
            return func(*args, **kwargs)
        q, k, v = args
        if torch.is_autocast_enabled("cuda"):  # SDPA is on autocast's lower-precision list
            q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
        assert q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
        assert q.dim() == 4 and q.size(-1) == k.size(-1) == v.size(-1) <= 256 and q.size(-1) % 8 == 0
        assert k.shape == v.shape and q.size(1) % k.size(1) == 0  # grouped-query heads, as enable_gqa passes them
        self.calls += 1
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, kwargs.get("is_causal", False),
                                                                 scale=kwargs.get("scale"))
        return out[0]


def full_size(case):
    """The full default shape of `case`, built with the CUDA layout, and one 8-GPU training micro-batch."""
    args = tg.Hyperparameters(CASES[case])
    model = tg.build_model(args, CUDA)
    batch = args.train_batch_tokens // (8 * args.train_seq_len)
    x = torch.randint(0, args.vocab_size, (batch, args.train_seq_len), device=CUDA)
    return args, model, x, torch.roll(x, -1, 1)


def expected_dtype(model, name, p):
    # The starter's layout: bf16 body, fp32 CastedLinear weights and control tensors (vectors included).
    module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    fp32 = isinstance(module, tg.CastedLinear) or p.ndim < 2 or any(pat in name for pat in tg.CONTROL_TENSOR_NAME_PATTERNS)
    return torch.float32 if fp32 else torch.bfloat16


@pytest.mark.parametrize("case", CASES)
def test_full_size_training_step_runs_on_fake_cuda_in_the_gpu_dtypes(case, fake_cuda, monkeypatch):
    args, model, x, y = full_size(case)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for name, p in params.items():
        assert p.device == CUDA and p.dtype == expected_dtype(model, name, p), name

    # The training forward (main's train_step), traced: autocast's casts become explicit ops in the graph.
    attention = GpuAttention(monkeypatch)

    def train_loss(params, buffers, x, y):
        with tg.autocast(CUDA), attention:
            return torch.func.functional_call(model, {**params, **buffers}, (x, y)).mean()

    graph = make_fx(train_loss)(params, buffers, x, y)
    loss = graph(params, buffers, x, y)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device == CUDA
    recurrent = (args.recur_loops - 1) * 3 if args.recur_layers and args.recur_start_frac <= 0 else 0
    assert attention.calls == args.num_layers + recurrent  # every attention call took the flash kernel in bf16
    matmuls = [n for n in graph.graph.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)]
    assert matmuls and all(a.meta["val"].dtype == torch.bfloat16 for n in matmuls for a in n.args)

    # Backward: autograd on fake CUDA tensors fails ("hasPrimaryContext expects a valid device index"), so the traced
    # forward, with its device arguments moved to the CPU, is replayed on fake CPU tensors of the same dtypes.
    for node in graph.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"].type == "cuda":
            node.kwargs = {**node.kwargs, "device": torch.device("cpu")}
    graph.recompile()
    leaves = {n: torch.empty_like(p, device="cpu").requires_grad_() for n, p in params.items()}
    graph(leaves, {n: b.cpu() for n, b in buffers.items()}, x.cpu(), y.cpu()).backward()
    for name, p in params.items():
        g = leaves[name].grad
        assert g is not None and g.shape == p.shape and g.dtype == p.dtype, name
        p.grad = g.to(CUDA)

    # The optimizer step, on fake CUDA: fused Adam, Muon's bf16 Newton-Schulz, global-norm clipping, renormalizing.
    optimizers, muon = tg.build_optimizers(args, model)
    norm = tg.step_optimizers(optimizers, muon, args.grad_clip_norm)
    model.after_optimizer_step()
    assert norm.device == CUDA and norm.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.device == CUDA and p.dtype == expected_dtype(model, name, p), name


# nGPT's compile is slow-marked: the README command keeps the default's (the loop) under 5 minutes on 2 cores
@pytest.mark.parametrize("case", [pytest.param("ngpt", marks=pytest.mark.slow), "gpt_recurrence"])
def test_full_size_forward_compiles_as_one_graph_on_fake_cuda(case, fake_cuda, monkeypatch):
    # fullgraph=True raises at the first graph break; the eager backend because inductor cannot compile fake CUDA.
    # GPT with recurrence compiles both branches of its torch.cond, so it covers the default GPT's graph too.
    args = tg.Hyperparameters(CASES[case])
    model = tg.build_model(args, CUDA)
    x = torch.randint(0, args.vocab_size, (2, args.train_seq_len), device=CUDA)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, dynamic=False, fullgraph=True)
    with tg.autocast(CUDA), GpuAttention(monkeypatch):
        loss = compiled(x, torch.roll(x, -1, 1)).mean()
    assert loss.dtype == torch.float32 and loss.device == CUDA
    # The graph (torch.cond's branches included) calls varlen_attn's op, as a GPU run with DOC_ATTENTION=1 does.
    ops = [str(n.target) for g in counter.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
           for n in m.graph.nodes]
    assert any("_varlen_attn" in op for op in ops)
