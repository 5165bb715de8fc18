"""The counted code (docs/counted-code.md): the counted copy holds only what a run's settings reach, fits the
bytes the records spend, runs exactly as the readable script does, and refuses settings it left the code of out."""

import hashlib
import importlib.util
import os
import random
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, TINY_ENV, data_env, run_train

RECORD_CODE_BYTES = 31_500  # below every frontier record's counted code (#1855: 31,999; #2135: 37,155; #2014: 38,134)


@pytest.fixture(scope="module")
def default_copy() -> bytes:
    """The counted copy of a default record run (no env var set), made as the run makes it."""
    return tg.counted_code((ROOT / "train_gpt.py").read_bytes(), tg.Hyperparameters({}))


def test_markers_drop_blocks_and_marked_lines_of_dropped_features_only():
    source = ("A = 1\n# [x]\nB = 2\n# [y]\nC = 3\n# [/y]\n# [/x]\nD = {\n    1: 1,  # [x]\n    2: 2,  # [y]\n}\n"
              "DROPPED_FEATURES = ()\n")
    assert tg.strip_features(source, ("x",)) == "A = 1\nD = {\n    2: 2,  # [y]\n}\nDROPPED_FEATURES = ('x',)\n"
    assert tg.strip_features(source, ()) == source
    with pytest.raises(ValueError, match="unbalanced"):
        tg.strip_features("# [x]\nA = 1\n", ("x",))


def test_every_feature_is_marked_in_balanced_blocks():
    source = (ROOT / "train_gpt.py").read_text()
    marked = {m[2] for m in re.finditer(r"# \[(/?)(\w+)\]$", source, re.M)}
    assert marked == set(tg.FEATURES)
    for name in tg.FEATURES:  # each dropped alone leaves no marker of it and no unbalanced block
        assert f"# [{name}]" not in tg.strip_features(source, (name,))


def test_default_record_run_counts_at_most_31500_bytes(default_copy):
    assert len(default_copy) <= RECORD_CODE_BYTES, len(default_copy)
    source = tg.plain_code(default_copy).decode()
    dropped = re.search(r"DROPPED_FEATURES=(.*)", source).group(1)
    for name in ("presets", "ngpt", "checkpoint", "starter", "shuffled", "ttt", "lora_ttt", "qat", "bigram", "codegen"):
        assert repr(name) in dropped
    assert "phased_ttt" in source and "class GPT" in source and "class NGPT" not in source
    assert "python_minifier" not in source  # the copy runs without the minifier: it is its own counted code
    assert "SMOKE_PRESET" not in source and "the starter's configuration" not in source  # presets and docs left out


def test_packed_literal_escapes_only_what_would_change_or_close_it(monkeypatch):
    blobs = [b"\x007\x00a\n\r'b''\\\x008\x00'", b"'", b"''", b"'''", b"\\'", bytes(range(256)) * 2,
             bytes(random.Random(0).choices(b"\x00\n\r'\\7a", k=4000))]
    monkeypatch.setitem(tg.COMPRESSORS, "brotli", (lambda b: blobs[int(b)], lambda b: b))
    assert tg.pack_code(b"0") == tg.CODE_PACK_HEAD + rb"\x007\0a" + b"\n" + rb"\r'b\''\\\x008\0\'" + tg.CODE_PACK_TAIL
    for i, blob in enumerate(blobs):
        packed = tg.pack_code(str(i).encode())
        literal = packed[len(tg.CODE_PACK_HEAD) - 3 : -len(tg.CODE_PACK_TAIL) + 3]  # with its quotes
        assert eval(literal.decode("latin-1")).encode("latin-1") == blob == tg.plain_code(packed)


def test_counted_copy_counts_itself_and_drops_only_what_the_settings_do_not_reach(default_copy):
    assert tg.counted_code(default_copy, tg.Hyperparameters({})) == default_copy
    reached = {name for name, needed in tg.FEATURES.items() if needed(tg.Hyperparameters({"MODEL": "ngpt", "TTT_ENABLED": "1"}))}
    assert reached == {"ngpt", "ttt"}
    for env in {"SMOKE": "1"}, {"BASELINE": "1"}, {"STACK": "1855"}:  # the presets: the SMOKE=1 copy keeps them
        assert tg.FEATURES["presets"](tg.Hyperparameters(env))


def test_counted_copy_refuses_settings_that_need_a_dropped_feature(default_copy, tmp_path):
    (tmp_path / "train_gpt.py").write_bytes(default_copy)
    for env, feature in (({"MODEL": "ngpt"}, "ngpt"), ({"CHECKPOINT_EVERY_SECONDS": "60"}, "checkpoint"),
                         ({"SMOKE": "1"}, "presets")):
        proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.fullmatch(rf"error: these settings need {feature}, which this counted copy of train_gpt.py left "
                            r"out .*; run the readable train_gpt.py\n", proc.stderr), proc.stderr[-2000:]


def import_copy(copy: bytes, tmp_path, monkeypatch):
    """A counted copy imported as a module (its main() not run)."""
    (tmp_path / "counted_copy.py").write_bytes(copy)
    spec = importlib.util.spec_from_file_location("counted_copy", tmp_path / "counted_copy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "counted_copy", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_copy_keeps_the_presets_and_resolves_the_same_settings(tmp_path, monkeypatch):
    env = {"SMOKE": "1", "RUN_ID": "smoke"}
    module = import_copy(tg.counted_code((ROOT / "train_gpt.py").read_bytes(), tg.Hyperparameters(env)), tmp_path,
                         monkeypatch)
    assert "presets" not in module.DROPPED_FEATURES
    settings = {k: str(v).replace(str(tmp_path), str(ROOT)) for k, v in module.Hyperparameters(env).settings.items()}
    assert settings == {k: str(v) for k, v in tg.Hyperparameters(env).settings.items()}


def test_default_copy_names_a_starter_artifact_it_cannot_read(default_copy, tmp_path, monkeypatch):
    blob = tg.STARTER_MAGIC + b"\x00" * 8
    assert tg.artifact_compressor(blob) == "zlib"
    with pytest.raises(Exception, match="a starter artifact, which this counted copy of train_gpt.py cannot read"):
        import_copy(default_copy, tmp_path, monkeypatch).artifact_compressor(blob)


def masked_tail(log: str) -> list[str]:
    """The lines from train_done on, wall-clock times masked: what two runs of one computation share."""
    tail = log[log.index("\ntrain_done") + 1 :].splitlines()
    times = re.compile(r"\b[\d.]+(ms|s)\b|(?<=tokens_per_s:)\d+|(?<=mfu:)[\d.]+%")
    return [times.sub("N", ln) for ln in tail]


@pytest.mark.slow
def test_counted_copy_runs_exactly_as_the_readable_script(tiny_run, tiny_data, tmp_path):
    cwd, log, _ = tiny_run
    copy = (cwd / "train_gpt.packed.py").read_bytes()
    sha = re.search(r"^code plain_bytes:\d+ packed_bytes:(\d+) counted:packed sha256:(\w+)$", log, re.M)
    assert (int(sha[1]), sha[2]) == (len(copy), hashlib.sha256(copy).hexdigest())
    (tmp_path / "train_gpt.py").write_bytes(copy)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE")}
    # the same settings to the letter (the artifact stores them): its TOKEN_LOSS_PATH too, rewritten with equal losses
    env.update(TINY_ENV, OMP_NUM_THREADS="1", RUN_ID="tiny", SEED="1", TOKEN_LOSS_PATH=str(cwd / "losses.npy"),
               **data_env(tiny_data))
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (tmp_path / "logs" / "tiny.txt").read_text()
    assert masked_tail(again) == masked_tail(log)
    assert re.search(rf"^code_sha256:{sha[2]} code_bytes:{len(copy)} ", again, re.M)  # the copy ran, and counted itself


@pytest.mark.slow  # plans the full-size default model: tens of seconds on a loaded machine
def test_plan_reports_the_planned_runs_counted_code_not_the_planners(default_copy, capsys):
    tg.print_plan(tg.Hyperparameters({"PLAN": "1"}))
    assert re.search(r"^plan bytes model:\d+ code:(\d+) ", capsys.readouterr().out, re.M)[1] == str(len(default_copy))
