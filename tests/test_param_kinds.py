"""param_kind: one function says what each parameter is, and the optimizer split, the CUDA dtype layout, QAT, the
quantizer and the size estimate ask it. Their answers on four tiny models (the recipe with BigramHash, value
embeddings, loop and lanes; an untied head with a full attention gate and other quantization settings; BASELINE=1;
nGPT) equal those of the code before it (tests/data/param_kinds_before_decl.json: describe() below run on main at
7f409ff, whose QAT stored (qmax, k) tuples)."""

import hashlib
import json

import pytest
import torch

import train_gpt as tg
from conftest import CPU, ROOT

SHAPE = {"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
         "TRAIN_SEQ_LEN": "64", "COMPILE": "0", "ROPE_DIMS": "8", "RUN_ID": "kinds"}
BEFORE = json.loads((ROOT / "tests/data/param_kinds_before_decl.json").read_text())


def describe(env: dict) -> dict:
    args = tg.Hyperparameters({**SHAPE, **env})
    torch.manual_seed(0)
    model = tg.build_model(args, CPU)
    for p in model.parameters():  # off the zero init, so that every tensor's codes matter
        p.data.add_(0.05 * torch.randn_like(p))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizers, _ = tg.build_optimizers(args, model)
    groups = [[type(o).__name__, [[[names[id(p)] for p in g["params"]], g["lr"], g.get("weight_decay")]
                                  for g in o.param_groups]] for o in optimizers]
    tg.configure_qat(model, args)
    qat = {n: [m.qat.keywords["qmax"], m.qat.keywords["k"]] for n, m in model.named_modules()
           if isinstance(m, tg.CastedLinear) and m.qat is not None}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blob = tg.pack_artifact(tg.quantize_state_dict(sd, args), {}, "zlib")
    layout = tg.cuda_layout(tg.MODELS[args.model](args), args)
    starter = hashlib.sha256(tg.pack_starter(tg.quantize_starter_int8(sd))).hexdigest() \
        if args.export_format == "starter" else None
    return {"env": env, "groups": groups, "qat": qat, "tensor_class": {n: tg.tensor_class(n, t) for n, t in sd.items()},
            "cuda_dtypes": {n: str(t.dtype) for n, t in [*layout.named_parameters(), *layout.named_buffers()]},
            "artifact_sha256": hashlib.sha256(blob).hexdigest(), "artifact_bytes": len(blob), "starter_sha256": starter,
            "estimate_model_bytes": tg.estimate_model_bytes(args, sd)}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_every_consumer_of_param_kind_answers_as_before(case):
    assert describe(BEFORE[case]["env"]) == BEFORE[case]


def test_every_parameter_has_a_kind_each_consumer_maps():
    for env in (case["env"] for case in BEFORE.values()):
        model = tg.MODELS[env.get("MODEL", "gpt")](tg.Hyperparameters({**SHAPE, **env}))
        kinds = {tg.param_kind(n, p) for n, p in model.named_parameters()}
        assert kinds <= set(model.GROUP_OF) and {"embed", "control", "attn", "mlp"} <= kinds
    assert tg.param_kind("blocks.0.attn.attn_gate", torch.zeros(4, 12)) == "gate"
    assert tg.param_kind("blocks.0.attn.attn_gate", torch.zeros(4)) == "control"
    assert tg.param_kind("bigram.weight", torch.zeros(64, 16)) == "table"
    assert tg.param_kind("bigram_proj.weight", torch.zeros(96, 16)) == "mlp"
    assert tg.param_kind("lm_head.weight", torch.zeros(128, 96)) == "head"
