"""Tests of records/: freeze, verify (and re-run), legality from declared eval paths, both significance rules,
compare and its per-token view, the SVG plot.

Training only in the real-runs test: elsewhere a stand-in train_gpt.py (FAKE_SCRIPT) writes logs in train_gpt.py's
log contract in milliseconds, so its logs carry a true code hash and true source; compare gets synthetic arrays.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "records"))

import compare  # noqa: E402
import freeze  # noqa: E402
import logparse as lp  # noqa: E402
import plot  # noqa: E402
import significance as sig  # noqa: E402
import verify  # noqa: E402

# A stand-in for train_gpt.py: resolves its settings from the env, writes logs/<RUN_ID>.txt in the contract.
# The triple-quoted block holds lines that look like log lines, and a 'source_end' line, inside the source.
FAKE_SCRIPT = r'''"""Stand-in train_gpt.py for tests: writes a log in the contract, trains nothing."""
import base64
import hashlib
import math
import os
import re
import sys
from pathlib import Path

DEFAULTS = {"SEED": "1337", "RUN_ID": "run", "SMOKE": "0", "TTT_ENABLED": "0", "LORA_TTT_ENABLED": "0",
            "NUM_LAYERS": "9", "DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKEN_LOSS_PATH": "",
            "FAKE_TRAIN_MS": "1000", "FAKE_EVAL_MS": "500", "FAKE_MODEL_BYTES": "900000", "FAKE_COUNTED": "0"}
LOOKALIKES = """
step:1/1 val_loss:9.0000 val_bpb:9.0000 train_time:1ms step_avg:1.00ms
eval_path:bogus adapts:1 rule:none
source_end
submission score:bogus val_loss:9.00000000 val_bpb:9.00000000 total_bytes:1 under_cap:1 train_time:1ms eval_time:1ms
"""


def main():
    s = {k: os.environ.get(k, v) for k, v in DEFAULTS.items()}
    code = Path(__file__).read_bytes()
    seed, layers = int(s["SEED"]), int(s["NUM_LAYERS"])
    val_loss = 2.0 + 0.001 * (seed % 7) + 0.01 * (layers - 9)
    val_bpb = val_loss / math.log(2) * 0.4
    train_ms, eval_ms, model_bytes = int(s["FAKE_TRAIN_MS"]), int(s["FAKE_EVAL_MS"]), int(s["FAKE_MODEL_BYTES"])
    # FAKE_COUNTED=1: the artifact counts a counted copy (CODE_PACK=1), here the script with a first line more
    counted = b"# counted copy\n" + code if s["FAKE_COUNTED"] == "1" else code
    total = model_bytes + len(counted)
    # the declared paths, as train_gpt.py's registry logs them; the last one enabled scores best
    paths = [("roundtrip", 0, "none", "int8_zlib_roundtrip")]
    paths += [("ttt", 1, "score_first", "ttt")] if s["TTT_ENABLED"] == "1" else []
    paths += [("lora_ttt", 1, "score_first", "lora_ttt")] if s["LORA_TTT_ENABLED"] == "1" else []
    what = paths[-1][3]
    out = [f"run_id:{s['RUN_ID']}"]
    out += [f"setting:{k}={v}" for k, v in sorted(s.items())]
    out += [f"env:{k}={os.environ[k]}" for k in sorted(DEFAULTS) if k in os.environ]
    out += [f"code_sha256:{hashlib.sha256(code).hexdigest()} code_bytes:{len(code)} code_path:{__file__}",
            f"versions python:3.11.9 torch:2.13.0+cpu numpy:2.4.6 sentencepiece:0.2.3",
            f"code plain_bytes:{len(code)} packed_bytes:{len(counted)} counted:{'packed' if counted != code else 'plain'} "
            f"sha256:{hashlib.sha256(counted).hexdigest()}"]
    out += [f"counted_code:{base64.b85encode(counted).decode()}"] if counted != code else []
    out += ["hardware:cpu:2 world_size:1 grad_accum_steps:8", "source_begin"]
    head = "\n".join(out) + "\n"
    tail = [f"train_loader:dataset:{os.path.basename(s['DATA_PATH'])} train_shards:1",
            f"val_loader:shards pattern={s['DATA_PATH']}/fineweb_val_*.bin tokens:65536",
            "model_params:17059912", "warmup_step:1/1"]
    for step in (1, 2):
        tail.append(f"step:{step}/2 train_loss:{6.0 - step:.4f} train_time:{step * train_ms // 2}ms step_avg:1.00ms")
    tail += [f"step:2/2 val_loss:{val_loss + 0.01:.4f} val_bpb:{val_bpb + 0.01:.4f} train_time:{train_ms}ms "
             f"step_avg:{train_ms / 2:.2f}ms",
             f"train_done steps:2 train_time:{train_ms}ms step_avg:{train_ms / 2:.2f}ms",
             "peak memory allocated: 10 MiB reserved: 12 MiB",
             f"final_prequant val_loss:{val_loss - 0.01:.4f} val_bpb:{val_bpb - 0.01:.4f} eval_time:{eval_ms // 5}ms",
             f"final_prequant_exact val_loss:{val_loss - 0.01:.8f} val_bpb:{val_bpb - 0.01:.8f}"]
    tail += [f"eval_path:{name} adapts:{adapts} rule:{rule}" for name, adapts, rule, _ in paths]
    tail += [f"Serialized model int8+zlib: {model_bytes} bytes",
             f"Code size: {len(counted)} bytes",
             f"Total submission size int8+zlib: {total} bytes",
             f"artifact:final_model.int8.pgolf format:int8_zlib model_bytes:{model_bytes} code_bytes:{len(counted)} "
             f"total_bytes:{total} cap:16000000 under_cap:{int(total <= 16000000)}"]
    for _, _, _, scored in paths:
        best = scored == what
        vl, vb, ms = (val_loss, val_bpb, eval_ms // 2) if best else (val_loss + 0.01, val_bpb + 0.01, eval_ms // 10)
        tail += [f"final_{scored} val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_time:{ms}ms",
                 f"final_{scored}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}"]
    if s["TOKEN_LOSS_PATH"]:
        tail.append(f"token_losses:{s['TOKEN_LOSS_PATH']} count:65535")
    tail += [f"submission score:{what} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} total_bytes:{total} "
             f"under_cap:{int(total <= 16000000)} train_time:{train_ms}ms eval_time:{eval_ms}ms",
             f"final_{what}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}"]
    Path("logs").mkdir(exist_ok=True)
    body = head.encode() + code + (b"" if code.endswith(b"\n") else b"\n") + b"source_end\n"
    Path(f"logs/{s['RUN_ID']}.txt").write_bytes(body + ("\n".join(tail) + "\n").encode())


if __name__ == "__main__":
    main()
'''

SMOKE_ENV = {"SMOKE": "1", "DATA_PATH": "./data/datasets/smoke_sp1024"}


def run_fake(workdir: Path, seed: int, **env) -> Path:
    """Run the stand-in script in workdir with SEED, RUN_ID and the given overrides; return its log."""
    script = workdir / "train_gpt.py"
    workdir.mkdir(parents=True, exist_ok=True)
    if not script.exists():
        script.write_text(FAKE_SCRIPT)
    run_id = env.pop("RUN_ID", f"seed{seed}_{abs(hash(tuple(sorted(env.items())))) % 10**6}")
    clean = {k: v for k, v in os.environ.items() if k not in ("SEED", "RUN_ID", "SMOKE", "NUM_LAYERS", "DATA_PATH",
                                                             "TTT_ENABLED", "LORA_TTT_ENABLED", "TOKEN_LOSS_PATH")}
    clean.update({"SEED": str(seed), "RUN_ID": run_id, **{k: str(v) for k, v in env.items()}})
    subprocess.run([sys.executable, "train_gpt.py"], cwd=workdir, env=clean, check=True)
    return workdir / "logs" / f"{run_id}.txt"


def do_freeze(logs, out: Path, *extra) -> int:
    return freeze.main([*map(str, logs), "--name", "Test Record", "--author", "A. Tester", "--github-id", "tester",
                        "--blurb", "stand-in runs", "--date", "2026-01-02", "--out", str(out), *extra])


@pytest.fixture(scope="session")
def frozen_template(tmp_path_factory):
    """A record folder frozen from three seeds of SMOKE=1 stand-in runs, on the non-record track (made once)."""
    base = tmp_path_factory.mktemp("template")
    logs = [run_fake(base / "run", seed, **SMOKE_ENV) for seed in (1, 2, 3)]
    assert do_freeze(logs, base / "record", "--track", "non_record_16mb") == 0
    return base / "record"


@pytest.fixture
def frozen(frozen_template, tmp_path):
    """A fresh copy of the template record, for a test to plant a defect in."""
    return Path(shutil.copytree(frozen_template, tmp_path / "record"))


def run_verify(capsys, folder, *extra) -> tuple[int, str]:
    code = verify.main([str(folder), *extra])
    return code, capsys.readouterr().out


def fail_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


# -----------------------------
# LOG PARSING
# -----------------------------

def test_log_parser_reads_every_contract_field(tmp_path):
    log = lp.parse_log(run_fake(tmp_path, 5, TTT_ENABLED="1", TOKEN_LOSS_PATH="x.npy"))
    script = (tmp_path / "train_gpt.py").read_bytes()
    assert log.seed == 5 and log.settings["NUM_LAYERS"] == "9" and log.env == {"TTT_ENABLED": "1",
                                                                               "TOKEN_LOSS_PATH": "x.npy",
                                                                               "SEED": "5", "RUN_ID": log.run_id}
    assert log.source == script and log.code_sha256 == lp.sha256_bytes(script) and log.code_bytes == len(script)
    assert log.versions["torch"] == "2.13.0+cpu" and log.hardware == "cpu:2" and log.world_size == 1
    assert log.fineweb_val and not log.smoke
    assert log.eval_paths == {"roundtrip": {"adapts": False, "rule": "none"},
                              "ttt": {"adapts": True, "rule": "score_first"}}  # not the lookalike in the source
    assert log.adapting_paths == {"ttt": "score_first"} and log.artifact_scores == ["int8_zlib_roundtrip", "ttt"]
    assert [s["step"] for s in log.train_steps] == [1, 2] and log.val_steps[0]["val_bpb"] > 0
    assert log.train_done == {"steps": 2, "train_time_ms": 1000, "step_avg_ms": 500.0}
    assert log.submission["what"] == "ttt" and log.submission["val_loss"] == pytest.approx(2.005)
    assert set(log.finals) == {"prequant", "int8_zlib_roundtrip", "ttt"}
    assert log.token_losses == {"path": "x.npy", "count": 65535}
    assert log.artifact["total_bytes"] == 900000 + len(script)
    assert all(c.ok for c in lp.run_checks(log)), [c.line() for c in lp.run_checks(log) if not c.ok]


def test_log_parser_ignores_lookalike_lines_inside_the_source(tmp_path):
    # the source holds a 'source_end' line and fake step/submission lines; the parser must not take them
    log = lp.parse_log(run_fake(tmp_path, 1))
    assert b"\nsource_end\n" in log.source and lp.sha256_bytes(log.source) == log.code_sha256
    assert log.submission["what"] == "int8_zlib_roundtrip" and len(log.val_steps) == 1


def test_log_parser_reads_boolean_settings_as_python_prints_them(tmp_path):
    path = run_fake(tmp_path, 1, **SMOKE_ENV)
    text = path.read_text()
    for printed, smoke in (("True", True), ("False", False), ("0", False)):
        path.write_text(text.replace("setting:SMOKE=1\n", f"setting:SMOKE={printed}\n", 1))
        assert lp.parse_log(path).smoke is smoke


def test_log_parser_refuses_a_log_holding_two_runs(tmp_path):
    path = run_fake(tmp_path, 1)
    path.write_text(path.read_text() * 2)  # train_gpt.py appends, so a reused RUN_ID does this
    with pytest.raises(lp.LogError, match="holds 2 runs"):
        lp.parse_log(path)


@pytest.mark.parametrize("dropped, named", [("submission score:", "submission score:"),
                                            ("train_done", "train_done"),
                                            ("code_sha256:", "code_sha256:"),
                                            ("source_end", "source_begin ... source_end")])
def test_log_parser_names_the_log_and_the_missing_line(tmp_path, dropped, named):
    path = run_fake(tmp_path, 1)
    kept = [ln for ln in path.read_text().split("\n") if not (ln.startswith(dropped) and
                                                              (dropped != "source_end" or ln == "source_end"))]
    path.write_text("\n".join(kept))
    with pytest.raises(lp.LogError) as err:
        lp.parse_log(path)
    assert str(path) in str(err.value) and named in str(err.value) and "\n" not in str(err.value)


# -----------------------------
# EVALUATION PATHS: legality from the declared names
# -----------------------------

def eval_path_check(path: Path, edit=None):
    """The log's eval-path check and its compliance flags, after edit(text) -> text plants a defect."""
    if edit:
        path.write_text(edit(path.read_text()))
    log = lp.parse_log(path)
    return lp.eval_path_check(log), lp.compliance([log])


def test_eval_paths_declared_score_first_and_scored_pass(tmp_path):
    check, flags = eval_path_check(run_fake(tmp_path, 1, TTT_ENABLED="1", LORA_TTT_ENABLED="1"))
    assert check.ok and check.detail == ("declared roundtrip adapts:0 rule:none, ttt adapts:1 rule:score_first, "
                                         "lora_ttt adapts:1 rule:score_first")
    assert flags["score_first_ttt"] and flags["adapting_eval_paths"] == ["lora_ttt", "ttt"]
    check, flags = eval_path_check(run_fake(tmp_path, 1))  # nothing adapts: legal, and no TTT to claim
    assert check.ok and not flags["score_first_ttt"] and flags["adapting_eval_paths"] == []


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("eval_path:ttt adapts:1 rule:score_first", "eval_path:ttt adapts:1 rule:none"),
     "adapts on val tokens without rule:score_first: ttt (rule:none)"),
    (lambda t: t.replace("eval_path:ttt adapts:1 rule:score_first\n", ""),
     "scored on the artifact but not declared: final_ttt"),
    (lambda t: t.replace("eval_path:roundtrip adapts:0 rule:none\n", ""),
     "scored on the artifact but not declared: final_int8_zlib_roundtrip"),
    (lambda t: t.replace("eval_path:ttt", "eval_path:sliding_window adapts:0 rule:none\neval_path:ttt", 1),
     "declared but never scored (no final_<name> line): sliding_window"),
])
def test_eval_path_check_flags_each_defect(tmp_path, edit, problem):
    check, flags = eval_path_check(run_fake(tmp_path, 1, TTT_ENABLED="1"), edit)
    assert not check.ok and problem in check.detail
    assert flags["score_first_ttt"] is False  # claimed only where the declarations hold


def test_a_log_without_eval_path_lines_fails_and_says_what_is_missing(tmp_path):
    drop = lambda t: "".join(ln for ln in t.splitlines(True) if not ln.startswith("eval_path:ttt"))  # noqa: E731
    check, flags = eval_path_check(run_fake(tmp_path, 1, TTT_ENABLED="1"),
                                   lambda t: drop(t).replace("eval_path:roundtrip adapts:0 rule:none\n", ""))
    assert not check.ok and "no 'eval_path:' lines" in check.detail and "re-run" in check.detail
    assert not flags["score_first_ttt"]


def test_lora_only_ttt_passes_verify_and_is_recorded_score_first(tmp_path, capsys):
    # the bug this guards: legality read from the substring "ttt" failed a run with only LORA_TTT_ENABLED=1
    logs = [run_fake(tmp_path / "run", s, LORA_TTT_ENABLED="1", **SMOKE_ENV) for s in (1, 2, 3)]
    assert do_freeze(logs, tmp_path / "lora", "--track", "non_record_16mb") == 0
    sub = json.loads((tmp_path / "lora" / "submission.json").read_text())
    assert sub["score_path"] == "lora_ttt" and sub["compliance"]["score_first_ttt"] is True
    assert sub["compliance"]["adapting_eval_paths"] == ["lora_ttt"]
    assert "- TTT: score-first (`lora_ttt`)" in (tmp_path / "lora" / "README.md").read_text()
    capsys.readouterr()
    code, out = run_verify(capsys, tmp_path / "lora")
    assert code == 0 and not fail_lines(out), out
    assert "PASS eval paths train_seed2.log: declared roundtrip adapts:0 rule:none, lora_ttt adapts:1 " \
           "rule:score_first" in out


# -----------------------------
# FREEZE
# -----------------------------

def test_freeze_then_verify_passes(frozen, frozen_template, capsys):
    sub = json.loads((frozen / "submission.json").read_text())
    assert (frozen / "train_gpt.py").read_bytes() == (frozen_template.parent / "run" / "train_gpt.py").read_bytes()
    assert sorted(p.name for p in frozen.iterdir()) == ["README.md", "submission.json", "train_gpt.py",
                                                        "train_seed1.log", "train_seed2.log", "train_seed3.log"]
    assert sub["seeds"] == [1, 2, 3] and sub["track"] == "track_non_record_16mb"
    assert sub["val_loss"] == pytest.approx(2.002) and sub["val_loss_std"] == pytest.approx(0.001)
    assert sub["bytes_code"] == len(FAKE_SCRIPT.encode()) and sub["bytes_total"] == 900000 + len(FAKE_SCRIPT.encode())
    assert sub["env"] == SMOKE_ENV and sub["hardware"] == "cpu:2" and sub["torch_version"] == "2.13.0+cpu"
    assert sub["compliance"]["smoke"] and not sub["compliance"]["fineweb_val"]
    assert sub["compliance"]["train_time_le_600s"] and sub["compliance"]["artifact_le_cap"]
    assert sub["compliance"]["num_seeds"] == 3 and sub["compliance"]["score_first_ttt"] is False
    readme = (frozen / "README.md").read_text()
    assert "- TTT: none" in readme
    assert "DATA_PATH=./data/datasets/smoke_sp1024 SMOKE=1 SEED=2 python3 train_gpt.py" in readme
    capsys.readouterr()
    code, out = run_verify(capsys, frozen)
    assert code == 0, out
    assert not fail_lines(out) and "SKIP significance" in out


def test_freeze_refuses_smoke_runs_under_records_track(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(freeze, "RECORDS_DIR", tmp_path / "records")
    smoke = [run_fake(tmp_path / "run", seed, **SMOKE_ENV) for seed in (1, 2)]
    args = ["--name", "Smoke", "--author", "a", "--github-id", "b", "--date", "2026-01-02"]
    assert freeze.main([*map(str, smoke), *args, "--track", "non_record_16mb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to write under records/track_*" in err and "SMOKE=1" in err and "\n" not in err
    assert not (tmp_path / "records").exists()
    # a real FineWeb run (not smoke) may go there
    real = [run_fake(tmp_path / "run", seed) for seed in (1, 2, 3)]
    assert freeze.main([*map(str, real), *args]) == 0
    assert (tmp_path / "records" / "track_10min_16mb" / "2026-01-02_Smoke" / "submission.json").is_file()


def test_freeze_refuses_seeds_of_different_configs(tmp_path, capsys):
    logs = [run_fake(tmp_path, 1), run_fake(tmp_path, 2, NUM_LAYERS=10)]
    assert do_freeze(logs, tmp_path / "out") == 2
    assert "NUM_LAYERS" in capsys.readouterr().err
    again = [run_fake(tmp_path, 1), run_fake(tmp_path, 1, RUN_ID="again")]
    assert do_freeze(again, tmp_path / "out") == 2
    assert "SEED=1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_freeze_refuses_nan_scores_unless_allowed(tmp_path, capsys):
    logs = [run_fake(tmp_path, 1), run_fake(tmp_path, 2)]
    text = logs[1].read_text()
    head, end, tail = text.rpartition("\nsource_end\n")  # seed 2 diverged: every score after the source NaN
    logs[1].write_text(head + end + re.sub(r"val_loss:\S+ val_bpb:\S+", "val_loss:nan val_bpb:nan", tail))
    assert logs[1].read_text() != text
    assert do_freeze(logs, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"freeze: error: submission.json would hold NaN or infinity ({logs[1]} val_loss nan "
                          "val_bpb nan): a diverged run is no result") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert do_freeze(logs, tmp_path / "out", "--allow-non-finite") == 0
    assert '"val_bpb": NaN' in (tmp_path / "out" / "submission.json").read_text()


def test_freeze_lists_only_imports_beyond_the_base_environment():
    source = b"import os, torch\nimport numpy as np\nimport zstandard\ntry:\n    import flash_attn_interface\n" \
             b"except ImportError:\n    pass\nfrom sentencepiece import SentencePieceProcessor\n"
    required, optional = freeze.extra_requirements(source)
    assert [r.split("==")[0] for r in required] == ["zstandard"] and optional == ["flash_attn_interface"]


# -----------------------------
# VERIFY: each defect a reviewer looks for
# -----------------------------

def test_verify_bad_input_exits_2_and_a_broken_folder_fails(frozen, tmp_path, capsys):
    assert verify.main([str(tmp_path / "nowhere")]) == 2
    assert verify.main([str(frozen), "--rerun", "--env", "NO_EQUALS_SIGN"]) == 2
    shutil.copy(frozen / "train_seed1.log", frozen / "train_seed9.log")
    code, out = run_verify(capsys, frozen)
    assert code == 1 and "unlisted logs in the folder: train_seed9.log" in out
    (frozen / "submission.json").unlink()
    code, out = run_verify(capsys, frozen)
    assert code == 1 and "FAIL files: missing submission.json" in out


def test_verify_flags_a_code_hash_mismatch(frozen, capsys):
    with open(frozen / "train_gpt.py", "a") as f:
        f.write("# edited after the runs\n")
    code, out = run_verify(capsys, frozen)
    assert code == 1
    assert {ln.split(":")[0] for ln in fail_lines(out)} >= {f"FAIL code hash train_seed{s}.log" for s in (1, 2, 3)}


def test_freeze_writes_the_counted_copy_and_verify_checks_it_against_the_logs(tmp_path, capsys):
    logs = [run_fake(tmp_path / "run", seed, FAKE_COUNTED="1", **SMOKE_ENV) for seed in (1, 2)]
    script = (tmp_path / "run" / "train_gpt.py").read_bytes()
    assert do_freeze(logs, tmp_path / "record", "--track", "non_record_16mb") == 0
    frozen_code = (tmp_path / "record" / "train_gpt.py").read_bytes()
    assert frozen_code == b"# counted copy\n" + script  # what the artifact counted, not the script that made it
    sub = json.loads((tmp_path / "record" / "submission.json").read_text())
    assert sub["bytes_code"] == len(frozen_code) and sub["code_sha256"] == lp.sha256_bytes(frozen_code)
    capsys.readouterr()
    code, out = run_verify(capsys, tmp_path / "record")
    assert code == 0 and not fail_lines(out), out
    assert "PASS counted file train_seed1.log" in out
    (tmp_path / "record" / "train_gpt.py").write_bytes(script)  # the readable script is not what was counted
    code, out = run_verify(capsys, tmp_path / "record")
    assert code == 1 and "FAIL code hash train_seed1.log" in out
    log = logs[0].read_text()  # a counted copy that does not hash to the logged sha256 cannot be frozen
    logs[0].write_text(re.sub(r"^counted_code:\S+$", "counted_code:" + base64.b85encode(b"other").decode(), log,
                              flags=re.M))
    assert do_freeze(logs, tmp_path / "record2", "--track", "non_record_16mb") == 2
    assert "does not hash to the logged sha256" in capsys.readouterr().err


def test_verify_flags_an_over_cap_artifact(tmp_path, capsys):
    over = [run_fake(tmp_path / "run", s, FAKE_MODEL_BYTES=15_999_000, **SMOKE_ENV) for s in (1, 2)]
    assert do_freeze(over, tmp_path / "over", "--track", "non_record_16mb") == 0
    code, out = run_verify(capsys, tmp_path / "over")
    assert code == 1 and "FAIL cap train_seed1.log" in out and "FAIL bytes_total" in out


def test_verify_flags_an_over_cap_figure_planted_in_a_log(frozen, capsys):
    log = frozen / "train_seed2.log"
    text = log.read_text()
    total = json.loads((frozen / "submission.json").read_text())["bytes_total"]
    log.write_text(text.replace(f"total_bytes:{total}", "total_bytes:16000001"))
    code, out = run_verify(capsys, frozen)
    assert code == 1 and "FAIL cap train_seed2.log" in out and "FAIL size sums train_seed2.log" in out


def test_verify_flags_an_over_time_run(tmp_path, capsys):
    slow = [run_fake(tmp_path / "run", s, FAKE_TRAIN_MS=600_001, **SMOKE_ENV) for s in (1, 2)]
    assert do_freeze(slow, tmp_path / "slow", "--track", "non_record_16mb") == 0
    code, out = run_verify(capsys, tmp_path / "slow")
    assert code == 1 and "FAIL train time train_seed1.log: 600.001 s > 600 s" in out
    assert json.loads((tmp_path / "slow" / "submission.json").read_text())["compliance"]["train_time_le_600s"] is False
    # the non-record track may run long when the reviewer says so
    code, out = run_verify(capsys, tmp_path / "slow", "--no-time-limits")
    assert code == 0, out


def test_verify_flags_an_eval_time_planted_in_a_log(frozen, capsys):
    log = frozen / "train_seed3.log"
    log.write_text(log.read_text().replace("eval_time:500ms", "eval_time:600001ms"))
    code, out = run_verify(capsys, frozen)
    assert code == 1 and "FAIL eval time train_seed3.log" in out


def test_verify_flags_a_log_that_scored_only_a_prefix_of_the_val_split(frozen, capsys):
    log = frozen / "train_seed1.log"
    text = log.read_text()
    log.write_text(text.replace("setting:SEED=1\n", "setting:SEED=1\nsetting:VAL_DOCS=3\n", 1))
    code, out = run_verify(capsys, frozen)
    assert code == 1 and "FAIL whole val split train_seed1.log: VAL_DOCS=3" in out, out


def test_verify_flags_scores_that_disagree_with_the_logs(frozen, capsys):
    sub = json.loads((frozen / "submission.json").read_text())
    sub["seed_results"][1]["val_bpb"] -= 0.01
    sub["val_bpb"] -= 0.0001
    (frozen / "submission.json").write_text(json.dumps(sub))
    code, out = run_verify(capsys, frozen)
    assert code == 1
    assert [ln.split(":")[0] for ln in fail_lines(out)] == ["FAIL scores train_seed2.log", "FAIL mean scores"]


def test_verify_flags_a_smoke_run_that_claims_the_record_track(tmp_path, capsys):
    logs = [run_fake(tmp_path / "run", s, **SMOKE_ENV) for s in (1, 2)]
    assert do_freeze(logs, tmp_path / "claim") == 0  # --out elsewhere: freeze allows it, verify does not
    code, out = run_verify(capsys, tmp_path / "claim")
    failed = {ln.split(":")[0] for ln in fail_lines(out)}
    assert code == 1 and failed == {"FAIL data", "FAIL hardware", "FAIL seeds"}


# -----------------------------
# SIGNIFICANCE
# -----------------------------

def test_student_t_cdf_matches_closed_forms_and_the_t_table():
    for t in (-7.0, -2.5, -0.3, 0.0, 1.1, 4.0):
        assert sig.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert sig.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # one-sided critical values from a printed t-table: P(T <= -t_crit) = alpha
    for df, t_crit, alpha in ((2, 6.965, 0.01), (3, 4.541, 0.01), (4, 3.747, 0.01), (5, 2.015, 0.05),
                              (10, 2.764, 0.01), (30, 2.457, 0.01)):
        assert sig.student_t_cdf(-t_crit, df) == pytest.approx(alpha, rel=2e-3)
        assert sig.student_t_ppf(alpha, df) == pytest.approx(-t_crit, abs=2e-3)
    assert sig.student_t_cdf(-2.326, 10_000) == pytest.approx(0.01, rel=5e-3)  # the normal limit


def test_improvement_test_matches_a_hand_computation():
    # 3 seeds, val_loss 1.980, 1.985, 1.982; previous record 2.000, so H0: mean >= 1.995.
    # mean = 5.947/3 = 1.98233333; deviations -0.00233333, +0.00266667, -0.00033333;
    # sum of squares = 5.4444e-6 + 7.1111e-6 + 0.1111e-6 = 12.6667e-6; s^2 = 6.3333e-6, s = 0.00251661;
    # se = s/sqrt(3) = 0.00145297; t = (1.98233333 - 1.995)/0.00145297 = -8.7178 with 2 df.
    # df = 2 has a closed form: p = 1/2 + t/(2 sqrt(2 + t^2)) = 1/2 - 8.7178/(2 x 8.8318) = 0.00645;
    # t-table, 2 df: t_0.01 = 6.965 < 8.718 < 9.925 = t_0.005, so 0.005 < p < 0.01: significant.
    r = sig.improvement_test([1.980, 1.985, 1.982], best_val_loss=2.0)
    assert r["mean"] == pytest.approx(1.98233333, abs=1e-8)
    assert r["std"] == pytest.approx(0.00251661, abs=1e-8)
    assert r["t"] == pytest.approx(-8.7178, abs=1e-4) and r["df"] == 2
    assert r["p_value"] == pytest.approx(0.00645, abs=1e-5) and 0.005 < r["p_value"] < 0.01
    assert r["significant"]
    # a gain smaller than 0.005 nats is never significant, however tight the seeds
    assert not sig.improvement_test([1.996, 1.9961, 1.9962], 2.0)["significant"]


def test_welch_test_matches_a_hand_computation():
    # new seeds' val_bpb 1.0600, 1.0610, 1.0590: mean 1.0600, deviations 0, +0.001, -0.001, s^2 = 2e-6/2 = 1e-6,
    #   v1 = s^2/3 = 3.33333e-7.
    # previous record's 1.0611, 1.0608, 1.0613: mean 1.06106667, deviations +0.0000333, -0.0002667, +0.0002333,
    #   sum of squares 0.0111e-7 + 0.7111e-7 + 0.5444e-7 = 1.26667e-7, s^2 = 6.33333e-8, v2 = 2.11111e-8.
    # se = sqrt(v1 + v2) = sqrt(3.54444e-7) = 5.95352e-4; t = (1.0600 - 1.06106667)/5.95352e-4 = -1.79166.
    # Welch-Satterthwaite: df = (v1 + v2)^2 / (v1^2/2 + v2^2/2) = 1.256309e-13 / (5.55556e-14 + 2.22840e-16)
    #   = 1.256309e-13 / 5.577840e-14 = 2.25232.
    # p = P(T_2.25 <= -1.79166): between the closed forms at 3 df, 1/2 + (t/(sqrt3 (1 + t^2/3)) + atan(t/sqrt3))/pi
    #   = 0.085552, and at 2 df, 1/2 + t/(2 sqrt(2 + t^2)) = 0.107532; scipy.stats.ttest_ind(new, previous,
    #   equal_var=False, alternative="less") gives p = 0.1003682. Below 0.25: the welch rule passes.
    r = sig.welch_test([1.0600, 1.0610, 1.0590], [1.0611, 1.0608, 1.0613])
    assert r["se"] == pytest.approx(5.95352e-4, rel=1e-6) and r["t"] == pytest.approx(-1.79166, abs=1e-5)
    assert r["df"] == pytest.approx(2.25232, abs=1e-5)
    assert 0.085552 < r["p_value"] < 0.107532 and r["p_value"] == pytest.approx(0.1003682, abs=1e-7)
    assert r["significant"] and r["alpha"] == 0.25
    # equal sizes and spreads make df exactly 2(n - 1) = 4, where the CDF has a closed form,
    # P(T_4 <= t) = 1/2 + (3/8) u (1 - t^2/(12 (1 + t^2/4))) with u = t/sqrt(1 + t^2/4):
    # diff -0.001, se = sqrt(2 x 1e-6/3) = 8.16497e-4, t = -1.2247449, t^2 = 1.5, 1 + t^2/4 = 1.375,
    # u = -1.2247449/1.1726039 = -1.0444659, 1 - 1.5/16.5 = 0.9090909, p = 0.5 - 0.375 x 1.0444659 x 0.9090909
    #   = 0.5 - 0.3560679 = 0.1439321.
    r = sig.welch_test([1.0590, 1.0600, 1.0610], [1.0600, 1.0610, 1.0620])
    assert r["t"] == pytest.approx(-1.2247449, abs=1e-7) and r["df"] == pytest.approx(4.0, abs=1e-9)
    assert r["p_value"] == pytest.approx(0.1439321, abs=1e-7)
    # no improvement at all is never significant; one previous seed has no spread to test against
    assert not sig.welch_test([1.07, 1.08], [1.06, 1.061])["significant"]
    with pytest.raises(ValueError, match="at least 2 seeds on each side"):
        sig.welch_test([1.0, 1.1], [1.05])


def test_previous_seeds_come_as_a_list_a_text_file_or_a_submission_json(frozen, tmp_path):
    assert sig.read_previous_seeds("1.0611,1.0608, 1.0613") == [1.0611, 1.0608, 1.0613]
    (tmp_path / "seeds.txt").write_text("1.0611\n1.0608\n1.0613\n")
    assert sig.read_previous_seeds(str(tmp_path / "seeds.txt")) == [1.0611, 1.0608, 1.0613]
    sub = json.loads((frozen / "submission.json").read_text())
    assert sig.read_previous_seeds(str(frozen / "submission.json")) == [r["val_bpb"] for r in sub["seed_results"]]
    with pytest.raises(ValueError, match="not numbers"):
        sig.read_previous_seeds("1.06,abc")


def test_verify_prints_the_significance_numbers(frozen, capsys):
    # the stand-in's seeds 1, 2, 3 score 2.001, 2.002, 2.003: mean 2.002, s = 0.001, se = 0.00057735.
    # Against 2.012: t = (2.002 - 2.007)/0.00057735 = -8.6603, p = 1/2 - 8.6603/(2 sqrt(77)) = 0.006536.
    code, out = run_verify(capsys, frozen, "--best-val-loss", "2.012")
    assert code == 0 and "PASS significance readme: t = -8.6603, df = 2, one-sided p = 0.006536 < 0.01 " \
                         "(val_loss mean 2.00200000 of 3 seeds vs previous record 2.01200000 - 0.005)" in out
    assert "INFO significance: passes readme" in out
    # Against 2.010: t = -5.1962, p = 1/2 - 5.1962/(2 sqrt(29)) = 0.017549 >= 0.01: not enough.
    code, out = run_verify(capsys, frozen, "--best-val-loss", "2.010")
    assert code == 1 and "FAIL significance readme: t = -5.1962, df = 2, one-sided p = 0.017549 >= 0.01" in out


def test_verify_reports_which_rule_a_record_passes(frozen, capsys):
    # val_bpb of the seeds: 1.15473311, 1.15531019, 1.15588727 against previous seeds 1.1556, 1.1560, 1.1558
    # (mean 1.1558, s 0.0002): Welch t = -1.3891 with 2.47 df, p = 0.1383 < 0.25, while the readme rule against
    # val_loss 2.010 fails (p = 0.017549 above)
    both = ("--best-val-loss", "2.010", "--previous-seeds", "1.1556,1.1560,1.1558")
    code, out = run_verify(capsys, frozen, *both)
    assert code == 1 and "FAIL significance readme" in out
    assert "PASS significance welch: t = -1.3891, df = 2.47, one-sided p = 0.138325 < 0.25" in out
    assert "INFO significance: fails readme; passes welch" in out
    code, out = run_verify(capsys, frozen, "--rule", "welch", *both)
    assert code == 0 and "significance readme" not in out and "INFO significance: passes welch" in out
    # the previous record's own submission.json; against itself nothing improves: t = 0, p = 1/2
    code, out = run_verify(capsys, frozen, "--previous-seeds", str(frozen / "submission.json"))
    assert code == 1 and "FAIL significance welch: t = 0.0000, df = 4.00, one-sided p = 0.500000 >= 0.25" in out
    code, out = run_verify(capsys, frozen, "--rule", "welch")
    assert code == 1 and "FAIL significance welch: the welch rule needs the previous record's seeds' val_bpb " \
                         "(--previous-seeds)" in out
    assert verify.main([str(frozen), "--previous-seeds", "1.15,x"]) == 2
    assert "--previous-seeds '1.15,x': not numbers" in capsys.readouterr().err


def test_freeze_records_both_rules_and_verify_rechecks_them(tmp_path, capsys):
    logs = [run_fake(tmp_path / "run", s, **SMOKE_ENV) for s in (1, 2, 3)]
    assert do_freeze(logs, tmp_path / "rec", "--track", "non_record_16mb", "--best-val-loss", "2.012",
                     "--previous-seeds", "1.1556,1.1560,1.1558") == 0
    stated = json.loads((tmp_path / "rec" / "submission.json").read_text())["significance"]
    assert stated["readme"]["p_value"] == pytest.approx(0.006536, abs=1e-6) and stated["readme"]["significant"]
    assert stated["welch"]["p_value"] == pytest.approx(0.138325, abs=1e-6)
    assert stated["welch"]["previous"] == [1.1556, 1.1560, 1.1558]
    readme = (tmp_path / "rec" / "README.md").read_text()
    assert "Against the previous record: passes `readme`; passes `welch`." in readme
    assert "- `welch` (the rule the maintainers applied in openai/parameter-golf #1902 and #2146: " in readme
    code, out = run_verify(capsys, tmp_path / "rec")
    assert code == 0 and "PASS recorded significance readme" in out and "PASS recorded significance welch" in out
    # a rule named without its input is bad input for freeze
    assert do_freeze(logs, tmp_path / "bad", "--track", "non_record_16mb", "--rule", "welch") == 2
    assert "--previous-seeds" in capsys.readouterr().err


# -----------------------------
# RE-RUN
# -----------------------------

def test_rerun_runs_the_script_inside_the_folder_with_the_recorded_overrides(frozen, capsys, monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "12")  # a stray shell value the recorded run did not use
    code, out = run_verify(capsys, frozen, "--rerun", "--seed", "2", "--env", "DATA_PATH=/elsewhere/smoke_sp1024")
    assert code == 0, out
    new = lp.parse_log(next((frozen / "logs").glob("rerun_seed2_*.txt")))
    assert new.settings["DATA_PATH"] == "/elsewhere/smoke_sp1024" and new.settings["SMOKE"] == "1"
    assert new.settings["NUM_LAYERS"] == "9" and new.seed == 2
    assert "PASS rerun score: SEED=2 int8_zlib_roundtrip: val_loss 2.00200000 vs recorded 2.00200000" in out


def test_rerun_flags_a_score_that_moved(frozen, capsys):
    code, out = run_verify(capsys, frozen, "--rerun", "--env", "NUM_LAYERS=10")
    assert code == 1 and "FAIL rerun score" in out and "+0.01000000" in out


# -----------------------------
# COMPARE
# -----------------------------

class FakeSP:
    """The SentencePieceProcessor methods compare.py uses, over a fixed list of pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def get_piece_size(self):
        return len(self.pieces)

    def id_to_piece(self, i):
        return self.pieces[i]

    def is_control(self, i):
        return self.pieces[i] in ("<pad>", "<s>", "</s>")

    def is_unknown(self, i):
        return self.pieces[i] == "<unk>"

    def is_unused(self, i):
        return False

    def is_byte(self, i):
        return self.pieces[i].startswith("<0x")


PIECES = ["<pad>", "<s>", "</s>", "<unk>", "<0x0A>", "<0xE2>", "\u2581the", "\u2581cat", "ing", "s", "7", "\u2581",
          ",", "\u2581(", "<script>", "\u2581sat"]


def synthetic_stream(n_docs=60, seed=0):
    """Tokens with BOS-led documents, bytes per target (0 for BOS), and two runs' losses (B a bit better)."""
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(n_docs):
        tokens += [1] + list(rng.integers(4, len(PIECES), size=int(rng.integers(5, 40))))
    tokens = np.array(tokens, dtype=np.int32)
    nbytes = np.where(tokens[1:] == 1, 0, rng.integers(1, 6, size=len(tokens) - 1)).astype(np.int32)
    loss_a = rng.gamma(2.0, 1.2, size=len(tokens) - 1).astype(np.float32)
    loss_b = (loss_a - 0.05 + rng.normal(0, 0.3, size=len(loss_a))).clip(0.01).astype(np.float32)
    return tokens, nbytes, loss_a, loss_b


def test_paired_ratio_ci_matches_a_hand_computation():
    # units: bits differences d = (-3, -1, -2), bytes b = (10, 10, 20); D = -6/40 = -0.15;
    # r = d - D b = (-1.5, 0.5, 1.0); sum r^2 = 3.5; se = sqrt(3/2 x 3.5)/40 = sqrt(5.25)/40 = 0.0572822;
    # 95% two-sided t quantile with 2 df = 4.302653, so the half-width is 0.246464.
    ci = sig.paired_ratio_ci([-3, -1, -2], [10, 10, 20])
    assert ci["diff"] == pytest.approx(-0.15) and ci["se"] == pytest.approx(0.0572822, abs=1e-7)
    assert ci["hi"] - ci["diff"] == pytest.approx(4.302653 * 0.0572822, abs=1e-5)


def test_paired_difference_equals_the_direct_bpb_difference(tmp_path):
    tokens, nbytes, loss_a, loss_b = synthetic_stream()
    docs = compare.target_docs(tokens)
    assert docs.max() == 59 and docs[0] == 0 and (np.diff(docs) >= 0).all()
    direct = (loss_b.astype(np.float64).sum() - loss_a.astype(np.float64).sum()) / math.log(2) / nbytes.sum()
    for block in (1, 4):
        ci = compare.paired_difference(loss_a, loss_b, nbytes, docs, block_docs=block)
        assert ci["diff"] == pytest.approx(direct, rel=1e-9) and ci["lo"] < direct < ci["hi"]
        assert ci["units"] == (60 if block == 1 else 15)
    lines, numbers = compare.analyse(tokens, nbytes, loss_a, loss_b, compare.token_class_lut(FakeSP(PIECES)))
    assert numbers["bpb_b"] - numbers["bpb_a"] == pytest.approx(direct, rel=1e-9)
    assert numbers["paired"]["hi"] < 0  # B is better by construction
    classes = [r for r in numbers["classes"] if not r["class"].startswith("rare")]
    assert sum(r["contribution"] for r in classes) == pytest.approx(direct, rel=1e-9)
    assert sum(r["tokens"] for r in classes) == len(tokens) - 1
    assert any(line.startswith("B - A:") for line in lines)


def test_token_classes_follow_the_pieces():
    lut = compare.token_class_lut(FakeSP(PIECES))
    names = {p: compare.CLASS_NAMES[c] for p, c in zip(PIECES, lut)}
    assert names["<s>"] == "boundary" and names["<0x0A>"] == "byte" and names["7"] == "digit"
    assert names[","] == "punct" and names["\u2581("] == "punct" and names["\u2581"] == "punct"
    assert names["\u2581the"] == "word_start" and names["ing"] == "word_cont"
    targets = np.array([6] * 90 + [7] * 8 + [9] * 2)
    rare = compare.rare_ids(targets, len(PIECES))
    assert rare[9] and not rare[7] and not rare[6]  # 2% of targets are id 9; ids 9 and 7 together are 10%


def test_per_token_page_is_self_contained_and_escaped(tmp_path):
    tokens, nbytes, loss_a, loss_b = synthetic_stream()
    starts = compare.doc_starts_of(tokens)
    page = compare.render_html(tokens, PIECES, loss_a, loss_b, nbytes, [0, 3], starts, "diff", ("GPT", "nGPT"),
                               ["summary <line>"])
    assert page.startswith("<!doctype html>") and page.count("<h2>") == 2
    assert "&lt;script&gt;" in page and "<script>" not in page and "summary &lt;line&gt;" in page
    assert "http" not in page and "src=" not in page  # nothing to fetch: opens offline
    from html.parser import HTMLParser

    class Balance(HTMLParser):
        depth, spans = 0, 0

        def handle_starttag(self, tag, attrs):
            self.depth += tag != "meta"
            self.spans += tag == "span" and ("title", None) not in attrs

        def handle_endtag(self, tag):
            self.depth -= 1

    parser = Balance()
    parser.feed(page)
    assert parser.depth == 0 and parser.spans >= int(starts[1] - starts[0]) - 1  # well formed, a span per token
    j = int(starts[3]) + 1
    assert f"nGPT {loss_b[j - 1]:.3f} | B-A {float(loss_b[j - 1]) - float(loss_a[j - 1]):+.3f}" in page
    single = compare.render_html(tokens, PIECES, loss_a, None, nbytes, [1], starts, "a", ("GPT", "B"), [])
    assert "loss of GPT" in single


def write_shard(path: Path, tokens) -> None:
    """The challenge's shard format: 256 int32 header (magic 20240520, version 1, count), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def test_compare_cli_counts_bytes_like_decoded_utf8(tiny_data, tmp_path, capsys):
    # train_gpt.py's byte counting through a real SentencePiece model (the tiny one: accents, the dash and the
    # lambda fall back to bytes); bytes must equal the decoded text's UTF-8
    _, model = tiny_data
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = ["Hello world, it is 2026.", "Caf\u00e9 na\u00efve \u2014 \u03bb-calculus (42 ways)!", "  spaced   out  "]
    tokens = []
    for d in docs:
        tokens += [1] + sp.encode(d)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 5, size=len(tokens) - 1).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", (a * 0.9).astype(np.float32))
    html_path = tmp_path / "view.html"
    code = compare.main([str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--data-path", str(tmp_path),
                         "--tokenizer", str(model), "--html", str(html_path), "--docs", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    utf8 = sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
    assert f"{utf8:,} bytes" in out
    want = a.astype(np.float64).sum() / math.log(2) / utf8
    assert f"A: bpb {want:.8f}" in out and html_path.read_text().count("<h2>") == 1


def test_compare_rejects_a_dump_longer_than_the_val_data(tmp_path):
    tokens, nbytes, loss_a, _ = synthetic_stream()
    with pytest.raises(compare.CompareError, match="different val data"):
        compare.analyse(tokens[:50], nbytes[:49], loss_a, None, compare.token_class_lut(FakeSP(PIECES)))


# -----------------------------
# PLOT
# -----------------------------

def test_plot_ticks_are_round_and_cover_the_data():
    assert plot.nice_ticks(4.0, 5.0) == [4.0, 4.2, 4.4, 4.6, 4.8, 5.0]
    assert plot.nice_ticks(0, 137) == [0, 50, 100, 150]
    assert plot.nice_ticks(1.1547, 1.1659) == [1.15, 1.155, 1.16, 1.165, 1.17]  # step 0.005 >= span/5
    assert plot.nice_ticks(2, 2) == [1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6]  # one value: a unit span around it


def test_plot_draws_every_seed_into_an_svg(frozen, tmp_path):
    import xml.etree.ElementTree as ET

    assert plot.main([str(frozen)]) == 0
    ns = {"s": "http://www.w3.org/2000/svg"}
    train, val = ET.parse(frozen / plot.PLOT_NAME).getroot().findall("s:g", ns)

    def curves(g):
        return {c.find("s:title", ns).text: [tuple(map(float, p.split(","))) for p in c.get("points").split()]
                for c in g.findall("s:polyline", ns)}

    box = train.find("s:rect", ns)
    x0, y0 = float(box.get("x")), float(box.get("y"))
    x1, y1 = x0 + float(box.get("width")), y0 + float(box.get("height"))
    lines = curves(train)
    assert sorted(lines) == ["seed 1", "seed 2", "seed 3"]
    for pts in lines.values():  # steps 1, 2 at train_loss 5.0, 4.0: rightwards and down the screen
        assert len(pts) == 2 and pts[0][0] < pts[1][0] and pts[0][1] < pts[1][1]
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in pts)
    assert {"4", "5"} <= {t.text for t in train.findall("s:text", ns)}  # the y ticks span the losses
    assert sorted(curves(val)) == ["seed 1", "seed 2", "seed 3"]
    dots = {c.find("s:title", ns).text: float(c.get("cy")) for c in val.findall("s:circle", ns)}
    assert list(dots) == ["seed 1 int8_zlib_roundtrip 1.15473311", "seed 2 int8_zlib_roundtrip 1.15531019",
                          "seed 3 int8_zlib_roundtrip 1.15588727"]
    assert list(dots.values()) == sorted(dots.values(), reverse=True)  # a better score sits lower
    # freeze --plot draws the same file and links it from the README
    logs = [frozen / f"train_seed{s}.log" for s in (1, 2, 3)]
    assert do_freeze(logs, tmp_path / "plotted", "--track", "non_record_16mb", "--plot") == 0
    assert (tmp_path / "plotted" / plot.PLOT_NAME).read_text() == (frozen / plot.PLOT_NAME).read_text()
    readme = (tmp_path / "plotted" / "README.md").read_text()
    assert f"![train and val curves of every seed]({plot.PLOT_NAME})" in readme


# -----------------------------
# REAL RUNS
# -----------------------------

@pytest.mark.slow  # whole runs: keeps the README command under 5 minutes on 2 cores
def test_freeze_and_verify_real_tiny_runs(tiny_run, tiny_data, tmp_path, capsys):
    """Two seeds of the real trainer, frozen and verified; the per-token dumps reproduce the logged scores."""
    from conftest import data_env, run_train

    cwd, _, losses1 = tiny_run
    run_dir = tmp_path / "seed2"  # its own folder: the shared tiny run's artifact stays as it was
    run_dir.mkdir()
    run_train(run_dir, data_env(tiny_data, RUN_ID="tiny2", SEED="2", TOKEN_LOSS_PATH=str(run_dir / "losses2.npy")))
    logs = [cwd / "logs" / "tiny.txt", run_dir / "logs" / "tiny2.txt"]
    assert do_freeze(logs, tmp_path / "record", "--track", "non_record_16mb") == 0
    capsys.readouterr()
    code, out = run_verify(capsys, tmp_path / "record")
    assert code == 0 and not fail_lines(out), out
    assert (tmp_path / "record" / "train_gpt.py").read_bytes() == (cwd / "train_gpt.packed.py").read_bytes()
    data_path, tok = tiny_data
    assert compare.main([str(losses1), str(run_dir / "losses2.npy"), "--data-path", str(data_path), "--tokenizer", str(tok),
                         "--logs", str(logs[0]), str(logs[1]), "--html", str(tmp_path / "view.html"), "--docs", "0"]) == 0
    assert "<html" in (tmp_path / "view.html").read_text().lower()


# -----------------------------
# estimate_size.py
# -----------------------------

def test_size_estimate_is_the_export_of_the_configuration_and_grows_with_it():
    import estimate_size
    import train_gpt as tg

    tiny = {"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
            "BIGRAM_BUCKETS": "64", "COMPRESSOR": "zlib", "QUANT_FLOAT_MAX": "4096"}  # 65,536: all of it stays float
    export, code_bytes, params = estimate_size.estimate(tg.Hyperparameters(tiny), steps=2, tokens=512)
    counted = tg.counted_code((REPO / "train_gpt.py").read_bytes(), tg.Hyperparameters(tiny))
    assert code_bytes == len(counted) and export.pruned == 0
    # The run's own export: the artifact it returns loads into the configured model.
    model, args = tg.model_from_artifact(export.blob, tg.torch.device("cpu"))
    assert args.num_layers == 2 and sum(p.numel() for p in model.parameters()) / 1e6 == params
    bigger, _, more = estimate_size.estimate(tg.Hyperparameters({**tiny, "NUM_LAYERS": "4"}), steps=2, tokens=512)
    assert more > params and len(bigger.blob) > len(export.blob) * 1.3, (len(export.blob), len(bigger.blob))
    int8, _, _ = estimate_size.estimate(tg.Hyperparameters({**tiny, "NUM_LAYERS": "4", "QUANT": "int8"}), 2, 512)
    assert len(int8.blob) > len(bigger.blob)  # wider codes, more bytes
    # Over the cap, the export prunes to fit, and the estimate reports it as over (exit 1).
    over, _, _ = estimate_size.estimate(tg.Hyperparameters({**tiny, "SIZE_MARGIN_BYTES": str(16_000_000 - 60_000)}), 2, 512)
    assert over.pruned > 0
