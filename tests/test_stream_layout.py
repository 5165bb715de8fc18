"""TRAIN_STREAM (issue 22, difference 3): a training micro-batch and a TTT chunk are one stream of documents cut at each
BOS and every L tokens from a document's start, as #2014's `_build_cu_seqlens` (max_doc_len L) cuts its flat rows:
the layout against its function, our model's loss and gradients on a stream against its model's on the same weights
(both attention kernels), and phased TTT's global SGD over chunks of several windows against its own function."""

import copy
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import CPU
from test_attention import varlen_by_segment
from test_recipe_2014 import compare, pair, record_2014, record_args  # noqa: F401 (record_2014: a fixture)
from test_recipe_model import TINY_OURS, TINY_RECORD, ours_from_record, tokens

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available")


def stream(n: int, seed: int) -> torch.Tensor:
    """n tokens of documents of 1 to 80 tokens (several times L = 16 and shorter), the first one begun before the
    stream (no BOS at 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (n,), generator=g)
    pos = int(torch.randint(1, 20, (1,), generator=g))
    while pos < n:
        ids[pos] = tg.BOS_ID
        pos += int(torch.randint(1, 80, (1,), generator=g))
    return ids


def their_segments(pr2014, ids: torch.Tensor, L: int) -> torch.Tensor:
    """Its segment starts (its cu_seqlens without the bucket's padding) for a flat row cut every L tokens."""
    cu, max_seqlen = pr2014._build_cu_seqlens((ids == tg.BOS_ID).nonzero().flatten().tolist(), ids.numel(), CPU, L, 64)
    assert max_seqlen <= L
    return cu.unique()


@pytest.mark.parametrize("seed", range(4))
def test_stream_segments_are_2014s_build_cu_seqlens(pr2014, monkeypatch, seed):
    """Rows of L = 16: our segment starts (where doc_positions is 0), doc_layout's packed cu_seqlens and dense mask all
    cut where its _build_cu_seqlens does, positions count from those starts; the rows' own layout (row starts) does
    not."""
    monkeypatch.setattr(tg, "MIN_DOC_TOKENS", 1)  # room for its one-token documents in the packed slots
    B, L = 8, 16
    ids = stream(B * L, seed)
    theirs = their_segments(pr2014, ids, L)
    rows = ids.view(B, L)
    pos = tg.doc_positions(rows)
    starts = (pos.flatten() == 0).nonzero().flatten()
    assert torch.equal(torch.cat([starts, torch.tensor([B * L])]), theirs.long())
    seg = torch.bucketize(torch.arange(B * L), theirs[1:].long(), right=True)
    assert torch.equal(pos.flatten(), torch.arange(B * L) - theirs.long()[seg])
    model = SimpleNamespace(doc_attention=True, attention_kernel="varlen")
    assert torch.equal(tg.doc_layout(model, rows, True)["cu_seqlens"].unique(), theirs)
    model.attention_kernel = "sdpa_masked"
    mask = tg.doc_layout(model, rows, True)["mask"][0, 0]
    assert torch.equal(mask, (seg[:, None] == seg[None, :]) & torch.ones(B * L, B * L, dtype=torch.bool).tril())
    assert not torch.equal(tg.doc_cu_seqlens(rows).unique(), theirs)  # rows cut elsewhere (this stream crosses them)


@pytest.mark.parametrize("kernel", ["sdpa_masked", "varlen"])
def test_stream_loss_and_gradients_equal_2014s_flat_row(record_2014, monkeypatch, kernel):
    """One 128-token micro-batch, ours as 4 rows of 32 with TRAIN_STREAM, its as one flat row cut every 32 (documents
    across a row boundary and longer than 32, loop on): the loss to 1e-5, every gradient to 1e-4 of its max. Our
    rows' own layout is not its."""
    monkeypatch.setattr(tg, "varlen_attn", varlen_by_segment)  # it checks every segment fits max_seqlen = 32
    monkeypatch.setattr(tg, "MIN_DOC_TOKENS", 16)  # 7 segments in 128 tokens: room for 10
    record, ours = pair(record_2014, TINY_OURS, TINY_RECORD)
    ours.attention_kernel = kernel
    loss_diff, grad_diff = compare(record_2014, record, ours, 128, 32, True, rows=4)
    print(f"stream {kernel}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-4
    x, y, _ = tokens(128, 128, True)
    with torch.no_grad():
        theirs = record(x, y, cu_seqlens=their_segments(record_2014, x[0], 32), max_seqlen=32)
        assert abs(ours(x.view(4, 32), y.view(4, 32)).mean().item() - theirs.item()) > 1e-4


def test_global_sgd_over_chunks_of_several_windows_is_2014s(record_2014):
    """Phased TTT's global SGD (sgd_pass) on a stream of 3 chunks of 3 windows of 32 tokens and a remainder each: the
    weights after its two trained chunks equal those of its train_val_ttt_global_sgd_distributed on the same weights
    (each chunk one flat stream cut every EVAL_SEQ_LEN); with TRAIN_STREAM=0 (rows) they do not."""
    L, chunk, lr = 32, 3 * 32 + 5, 0.5
    record, ours = pair(record_2014, TINY_OURS, TINY_RECORD)
    record.looping_active = True
    ours.set_recurrence(True)
    h = record_args(record_2014, **TINY_RECORD, eval_seq_len=L, global_ttt_chunk_tokens=chunk, global_ttt_lr=lr,
                    rank=0, world_size=1)
    ids = stream(3 * chunk, 5)
    start = {n: t.clone() for n, t in ours.state_dict().items()}
    rows = copy.deepcopy(ours)
    env = {**TINY_OURS, "EVAL_SEQ_LEN": str(L), "TTT_CHUNK_TOKENS": str(chunk), "TTT_LR": str(lr), "COMPILE": "0",
           "LORA_CHUNK_TOKENS": str(L)}
    tg.sgd_pass(tg.Hyperparameters(env), ours, ours, ids, 0, 1, CPU)
    tg.sgd_pass(tg.Hyperparameters({**env, "TRAIN_STREAM": "0"}), rows, rows, ids, 0, 1, CPU)
    record_2014.train_val_ttt_global_sgd_distributed(h, CPU, None, record, ids)
    theirs = ours_from_record(record.state_dict(), len(ours.blocks))

    def worst(model):
        return max(((t - theirs[n]).abs().max() / (theirs[n] - start[n]).abs().max()).item()
                   for n, t in model.state_dict().items() if n in theirs and not n.startswith("softcap"))

    print(f"global SGD: stream {worst(ours):.2e}, rows {worst(rows):.2e} of the largest update")
    assert worst(ours) < 1e-3 < worst(rows)



def test_global_sgd_deals_each_rank_a_consecutive_run_as_2014s():
    """7 sequences of a chunk over 3 ranks: rank r trains sequences 7r // 3 .. 7(r + 1) // 3 (its my_seq_s:my_seq_e),
    one stream each; a rank short of one pads with zero-weight rows after its own."""
    args = tg.Hyperparameters({**TINY_OURS, "EVAL_SEQ_LEN": "32", "TTT_CHUNK_TOKENS": str(7 * 32),
                               "LORA_CHUNK_TOKENS": "32"})
    model = tg.build_model(args, CPU)
    deals = [tg.ChunkSGD(args, model, model, rank, 3, CPU) for rank in range(3)]
    assert [(d.seq_starts // 32).tolist() for d in deals] == [[0, 1, 0], [2, 3, 0], [4, 5, 6]]
    assert [d.weight.tolist() for d in deals] == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
