"""torch.compile on the CPU inductor: a tiny run with COMPILE=1 goes through every switch a run makes (warm-up and
restore, QAT on, recurrence on, warmdown, EMA applied, the export's stages, each evaluation path) with no graph
break, and its training steps compile once and never again."""

import re

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, data_env


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_a_compiled_run_never_breaks_a_graph_and_trains_on_the_graphs_its_warm_up_compiled(
        model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE", "BASELINE"):
        monkeypatch.delenv(name, raising=False)
    switches = {"QAT_START": "0.5"} if model == "ngpt" else {"QAT_START": "0.5", "RECUR_LAYERS": "0-1",
                                                             "RECUR_START_FRAC": "0.25"}
    env = {**TINY_ENV, **data_env(tiny_data, RUN_ID=model, MODEL=model, COMPILE="1", ITERATIONS="8", WARMUP_STEPS="2",
                                  WARMDOWN_FRAC="0.5", EVAL_STRIDE="32", TTT_ENABLED="1", TTT_CHUNK_TOKENS="4096",
                                  TTT_EPOCHS="1", LORA_TTT_ENABLED="1", LORA_SLOTS="4", LORA_CHUNK_TOKENS="32",
                                  PHASED_TTT_ENABLED="1", PHASED_TTT_PREFIX_DOCS="8",
                                  **switches)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    graphs = {}
    train = tg.train

    def train_counting(run, data, t):  # the loop's steps, after the warm-up compiled them
        graphs["before"] = counters["stats"]["unique_graphs"]
        clock = train(run, data, t)
        graphs["after"] = counters["stats"]["unique_graphs"]
        return clock

    monkeypatch.setattr(tg, "train", train_counting)
    tg.main()
    log = (tmp_path / "logs" / f"{model}.txt").read_text()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs["before"] > 0 and graphs["after"] == graphs["before"]  # QAT, recurrence, warmdown: no recompile
    assert re.search(r"^qat:on step:4/8", log, re.M) and (model == "ngpt" or re.search(r"^recurrence:on step:2/8", log, re.M))
    assert re.search(r"^ema:applied", log, re.M)
    for what in ("sliding_window", "ttt", "lora_ttt", "phased_ttt"):
        assert re.search(rf"^final_{what}_exact ", log, re.M), what
    # A fixed, small number for the whole run (17 with phased_ttt: its windows' dynamic length, its training graph).
    assert counters["stats"]["unique_graphs"] <= 18
