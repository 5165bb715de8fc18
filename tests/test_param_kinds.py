"""param_kind: one function says what each parameter is, and the optimizer split, the CUDA dtype layout, QAT, the
quantizer and the size estimate ask it. (When it replaced five name-substring rules, every consumer's answers on
four tiny models were shown equal to the code before it, bit for bit: commit 8ca05f5; that snapshot test went once
later settings changed the manifest's bytes.)"""

import torch

import train_gpt as tg

SHAPE = {"VOCAB_SIZE": "128", "NUM_LAYERS": "4", "MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
         "TRAIN_SEQ_LEN": "64", "COMPILE": "0", "ROPE_DIMS": "8", "RUN_ID": "kinds"}
# Four tiny models: the recipe with BigramHash, value embeddings, loop and lanes; an untied head with a full
# attention gate and other quantization settings; BASELINE=1; nGPT.
ENVS = {
    "default": {"RECUR_LAYERS": "1-2", "PARALLEL_LANES_FROM": "3", "VALUE_EMBED_LAYERS": "2", "BIGRAM_BUCKETS": "64",
                "BIGRAM_DIM": "16"},
    "untied": {"TIE_EMBEDDINGS": "0", "SMEAR_GATE_DIMS": "0", "ATTN_GATE_DIMS": "96", "QUANT_GATE": "float",
               "QUANT_CONTROL": "fp32", "QUANT_MLP": "int5", "QUANT_EMBED": "fp16", "LOWRANK_RANK": "0"},
    "baseline": {"BASELINE": "1"},
    "ngpt": {"MODEL": "ngpt", "BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "16", "TIE_EMBEDDINGS": "0"},
}


def test_every_parameter_has_a_kind_each_consumer_maps():
    for env in ENVS.values():
        model = tg.MODELS[env.get("MODEL", "gpt")](tg.Hyperparameters({**SHAPE, **env}))
        kinds = {tg.param_kind(n, p) for n, p in model.named_parameters()}
        assert kinds <= set(model.GROUP_OF) and {"embed", "control", "attn", "mlp"} <= kinds
    assert tg.param_kind("blocks.0.attn.attn_gate", torch.zeros(4, 12)) == "gate"
    assert tg.param_kind("blocks.0.attn.attn_gate", torch.zeros(4)) == "control"
    assert tg.param_kind("bigram.weight", torch.zeros(64, 16)) == "table"
    assert tg.param_kind("bigram_proj.weight", torch.zeros(96, 16)) == "mlp"
    assert tg.param_kind("lm_head.weight", torch.zeros(128, 96)) == "head"
