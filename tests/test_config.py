"""The HYPERPARAMETERS section: env vars and presets, every rule of validate() (ranges, names, shapes, settings of
the other MODEL), the declarations, and docs/settings.md generated from them."""

import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, tiny_args


def test_import_has_no_side_effects(tmp_path):
    code = "import train_gpt, torch.distributed as d; assert not d.is_initialized()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_misspelt_or_lower_case_setting_stops_the_run_naming_the_intended_one_unless_allowed():
    env = {"NUM_LAYER": "3", "MATRX_LR": "0.1", "iterations": "3", "PATH": "/bin", "http_proxy": "x", "NUM_LAYERS": "9"}
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters(env)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("did you mean") == 3, msg
    assert "NUM_LAYER " in msg and "MATRX_LR is not a setting; did you mean MATRIX_LR?" in msg
    assert "iterations is not a setting; did you mean ITERATIONS?" in msg
    assert "ALLOW_ENV=MATRX_LR,NUM_LAYER,iterations" in msg
    args = tg.Hyperparameters({**env, "ALLOW_ENV": "MATRX_LR,NUM_LAYER,iterations"})
    assert args.iterations == 20000 and args.num_layers == 9  # let through, and unread


def test_a_misspelt_setting_stops_a_run_before_anything_else(tmp_path, monkeypatch, capsys):
    # Before the data is looked for (there is none here): the typo, not the missing data, is what the user hears.
    monkeypatch.chdir(tmp_path)
    for name, value in {"MATRX_LR": "0.1", "DATA_PATH": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tg.ConfigError, match="^env MATRX_LR is not a setting; did you mean MATRIX_LR"):
        tg.main()
    assert capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []


def test_smoke_preset_yields_to_explicit_env():
    args = tg.Hyperparameters({"SMOKE": "1", "ITERATIONS": "7"})
    assert args.iterations == 7 and args.model_dim == int(tg.SMOKE_PRESET["MODEL_DIM"])
    assert tg.Hyperparameters({}).model_dim == 512


def test_baseline_preset_restores_the_starter_under_smoke_and_explicit_env():
    stack, starter = tg.Hyperparameters({"STACK": "1.1194"}).settings, tg.Hyperparameters({"BASELINE": "1"}).settings
    assert all(stack[k] != starter[k] for k in tg.BASELINE_PRESET)  # no dead entries (BASELINE=1 is on STACK=1.1194)
    recipe = tg.Hyperparameters({}).settings
    assert all(recipe[k] != stack[k] for k in tg.STACK_1194_PRESET)  # every entry changes something
    assert (starter["NUM_LAYERS"], starter["MLP_MULT"], starter["MLP_ACT"], starter["QUANT"]) == (9, 2, "relu2", "int8")
    args = tg.Hyperparameters({"SMOKE": "1", "BASELINE": "1", "MLP_ACT": "swiglu"})
    assert args.num_layers == int(tg.SMOKE_PRESET["NUM_LAYERS"]) and args.ttt_enabled  # the smoke scale wins
    assert args.mlp_act == "swiglu" and args.bigram_buckets == 0 and args.mlp_mult == 2  # explicit, then starter


# Each rule of validate() with a value that breaks it: the error is one line naming the variable.
BAD_SETTINGS = [
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS"), ({"MODEL": "rnn"}, "MODEL"), ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS"),
    ({"QUANT": "int3"}, "QUANT"), ({"QUANT_MLP": "int4"}, "QUANT_MLP"), ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"MUON_NS_COEFFS": "cubic"}, "MUON_NS_COEFFS"), ({"TRAIN_LOADER": "random"}, "TRAIN_LOADER"),
    ({"TRAIN_LOADER": "shuffled"}, "TRAIN_STREAM"),
    ({"COMPRESSOR": "gzip"}, "COMPRESSOR"), ({"GPTQ": "yes"}, "GPTQ"), ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"ROPE_DIMS": "3"}, "ROPE_DIMS"), ({"ROPE_DIMS": "16"}, "ROPE_DIMS"), ({"ATTN_GATE_DIMS": "64"}, "ATTN_GATE_DIMS"),
    ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS"), ({"RECUR_LAYERS": "3-5"}, "RECUR_LAYERS"),
    ({"RECUR_LAYERS": "2"}, "RECUR_LAYERS"), ({"RECUR_LAYERS": "1-2", "RECUR_LOOPS": "1"}, "RECUR_LOOPS"),
    ({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS"),
    ({"LORA_TTT_ENABLED": "1", "LORA_CHUNK_TOKENS": "4096"}, "LORA_CHUNK_TOKENS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"), ({"MAX_WALLCLOCK_SECONDS": "0.4"}, "GPTQ_RESERVE_SECONDS"),
    # out of range: negative counts, zero sizes, fractions outside [0, 1], open bounds
    ({"ITERATIONS": "-5"}, "ITERATIONS"), ({"ITERATIONS": "0"}, "ITERATIONS"), ({"TRAIN_BATCH_TOKENS": "0"}, "TRAIN_BATCH_TOKENS"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS"), ({"WARMUP_STEPS": "-1"}, "WARMUP_STEPS"), ({"EVAL_STRIDE": "-1"}, "EVAL_STRIDE"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"), ({"QAT_START": "-0.1"}, "QAT_START"), ({"EMA_DECAY": "1.0"}, "EMA_DECAY"),
    ({"BETA2": "1"}, "BETA2"), ({"NORM_PCT_DROPOUT": "1"}, "NORM_PCT_DROPOUT"), ({"ADAM_EPS": "0"}, "ADAM_EPS"),
    ({"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP"), ({"SIZE_MARGIN_BYTES": "-1"}, "SIZE_MARGIN_BYTES"),
    ({"MATRIX_LR": "-0.01"}, "MATRIX_LR"), ({"PARALLEL_RESID_FROM": "-2"}, "PARALLEL_RESID_FROM"),
    ({"SEED": "-1"}, "SEED=-1"), ({"SEED": str(2**32)}, "SEED=4294967296"), ({"SEED": "1e20"}, "SEED"),
    ({"MODEL_DIM": "1000000"}, "MODEL_DIM=1000000"), ({"VOCAB_SIZE": "2000000000"}, "VOCAB_SIZE=2000000000"),
    # settings of the other model, set explicitly
    ({"MODEL": "ngpt", "SMEAR_GATE": "1"}, "SMEAR_GATE"), ({"MODEL": "ngpt", "VALUE_EMBED_LAYERS": "2"}, "VALUE_EMBED_LAYERS"),
    ({"MODEL": "ngpt", "MUON_WD": "0.1"}, "MUON_WD"), ({"NGPT_MATRIX_LR": "0.1"}, "NGPT_MATRIX_LR"),
]


@pytest.mark.parametrize("env,needle", BAD_SETTINGS, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_each_broken_rule_is_a_one_line_config_error_naming_the_variable(env, needle):
    with pytest.raises(tg.ConfigError, match=needle) as e:
        tiny_args(**{"NUM_LAYERS": "4", "BASELINE": "0", "ROPE_DIMS": "4", **env})
    assert "\n" not in str(e.value)


def test_every_numeric_setting_has_a_range_and_every_check_holds_its_default():
    unchecked = {s.name for s in tg.SETTINGS.values() if s.cast in (int, float) and not isinstance(s.check, str)}
    assert unchecked == set()
    assert all(s.check is None for s in tg.SETTINGS.values() if s.cast is tg._flag)
    for model in ("gpt", "ngpt"):
        for name, value in tg.Hyperparameters({"MODEL": model}).settings.items():
            tg.SETTINGS[name].check_value(value)
    assert all(tg.in_interval(0.5, i) for i in ("[0, 1)", "(0, inf)", "[0, 1]"))
    assert not any(tg.in_interval(v, i) for v, i in ((1.0, "[0, 1)"), (0.0, "(0, inf)"), (-1.0, "[0, 1]")))


def test_each_model_reads_and_logs_only_its_own_settings():
    only = {m: {s.name for s in tg.SETTINGS.values() if s.model == m} for m in ("gpt", "ngpt")}
    gpt, ngpt = (set(tg.Hyperparameters({"MODEL": m}).settings) for m in ("gpt", "ngpt"))
    assert gpt == set(tg.SETTINGS) - only["ngpt"] and ngpt == set(tg.SETTINGS) - only["gpt"]
    assert only["ngpt"] == {name for name in tg.SETTINGS if name.startswith("NGPT_")}
    # Presets may set the other model's settings: only an explicit one is refused.
    args = tg.Hyperparameters({"MODEL": "ngpt", "BASELINE": "1", "SMOKE": "1"})
    assert args.mlp_mult == 2 and args.num_layers == 4 and "SMEAR_GATE" not in args.settings


@pytest.mark.parametrize("preset", [n for n in dir(tg) if n.endswith("_PRESET")])
def test_every_preset_entry_is_a_declared_setting_whose_value_parses_and_lies_in_range(preset):
    for name, raw in getattr(tg, preset).items():
        setting = tg.SETTINGS[name]
        setting.check_value(setting.cast(raw))


@pytest.mark.parametrize("name", list(tg.STACKS))
def test_each_stack_changes_every_setting_it_names_from_its_base(name):
    base, preset, smoke = tg.STACKS[name]
    for raw_name, raw in {**preset, **smoke}.items():
        setting = tg.SETTINGS[raw_name]
        setting.check_value(setting.cast(raw))
    if base:
        mine, theirs = tg.Hyperparameters({"STACK": name}), tg.Hyperparameters({"STACK": base})
        assert [k for k in preset if getattr(mine, k.lower()) == getattr(theirs, k.lower())] == []
    assert tg.Hyperparameters({"STACK": name, "SMOKE": "1"}).num_layers == int(tg.SMOKE_PRESET["NUM_LAYERS"])


def test_each_setting_choice_has_an_implementation():
    # The choices are declared with the setting (validation needs nothing defined later); the code behind them agrees.
    choices = {name: set(s.check) for name, s in tg.SETTINGS.items() if isinstance(s.check, tuple)}
    assert choices["MODEL"] == set(tg.MODELS) and choices["MUON_NS_COEFFS"] == set(tg.NS_COEFFS)
    assert choices["STACK"] == set(tg.STACKS) | set(tg.STACK_ALIASES)
    assert choices["TRAIN_LOADER"] == set(tg.TRAIN_LOADERS) and choices["PLAN_GPU"] == set(tg.load_planner().GPU_SPECS)
    assert all(choices[q] == set(tg.QUANT_BITS) for q in ("QUANT", "QUANT_ATTN", "QUANT_MLP", "QUANT_EMBED"))


def test_config_errors_come_before_any_data_is_read(tmp_path):
    # No data at all: the bad setting is what the user hears about, in one line, with exit 2.
    env = {"PATH": "/usr/bin:/bin", "SMOKE": "1", "ITERATIONS": "-5", "DATA_PATH": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: ITERATIONS=-5 is out of range: it must lie in [1, inf)"], proc.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


def test_docs_settings_table_is_generated_from_the_declarations():
    from settings_doc import settings_markdown

    assert (ROOT / "docs/settings.md").read_text() == settings_markdown(), "run python3 records/settings_doc.py"
