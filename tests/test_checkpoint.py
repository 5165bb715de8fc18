"""Checkpoints and resume (issue 15): loader positions, exact continuation after SIGTERM, bad checkpoints refused in
one line, a diverged run stopped before export, a resumed log flagged by the record checks."""

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CPU, ROOT, TINY_ENV, data_env, run_train, tiny_args, train_losses
import train_gpt as tg

sys.path.insert(0, str(ROOT / "records"))
import logparse as lp  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finals(log: str) -> list[str]:
    return re.findall(r"^final_\w+_exact .*$", log, re.M)


# -----------------------------
# Loader positions
# -----------------------------

def write_shard(path: Path, tokens: list[int]) -> None:
    header = torch.zeros(tg.HEADER_INTS, dtype=torch.int32)
    header[0], header[1], header[2] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    path.write_bytes(header.numpy().tobytes() + torch.tensor(tokens, dtype=torch.int16).numpy().tobytes())


@pytest.mark.parametrize("name", ["sequential", "shuffled"])
@pytest.mark.parametrize("depths", [(0, 0), (2, 0), (3, 1)])
def test_a_loader_restored_from_its_state_deals_what_the_original_deals_next(tmp_path, name, depths):
    # depths: the original's and the restored one's PREFETCH_BATCHES; batches read ahead are not in the state.
    for i, n in enumerate((700, 450, 900)):  # shards of several lengths: the position crosses shards and passes
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [(7 * j + i) % 100 for j in range(n)])
    args = tiny_args(DATA_PATH=str(tmp_path), VOCAB_SIZE=100, TRAIN_LOADER=name, TRAIN_STREAM=0, SEED=3)
    batch = (256, 16, 2)  # global tokens, seq_len, grad_accum

    def loader(depth):
        return tg.BatchPrefetcher(tg.TRAIN_LOADERS[name](args, 0, 1), CPU, depth)

    original = loader(depths[0])
    for _ in range(9):
        original.next_batch(*batch)
    state = original.state_dict()
    restored = loader(depths[1])
    restored.load_state_dict(state)
    for _ in range(12):  # more than a whole pass of the data
        for a, b in zip(original.next_batch(*batch), restored.next_batch(*batch)):
            assert torch.equal(a, b)
    original.close()
    restored.close()


# -----------------------------
# Stop signals agreed by the ranks
# -----------------------------

def _stop_worker(rank, init_file, out, env):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    run = SimpleNamespace(args=tiny_args(**env), device=CPU, distributed=True)
    clock = tg.TrainClock(run)
    clock.start()
    seen = []
    for _ in range(tg.STOP_CHECK_STEPS):
        clock.tick(signal.SIGTERM if rank == 1 else 0)  # only rank 1 was signalled
        seen.append(clock.stop_signal)
    out[rank] = seen
    dist.destroy_process_group()


@pytest.mark.parametrize("env, first", [({"MAX_WALLCLOCK_SECONDS": 100, "GPTQ": 0}, 1),  # agreed every step
                                        pytest.param({"MAX_WALLCLOCK_SECONDS": 0}, tg.STOP_CHECK_STEPS,  # every 10 steps
                                                     marks=pytest.mark.slow)])  # (slow: the README command's 5 minutes)
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, env, first):
    out = mp.Manager().dict()
    mp.spawn(_stop_worker, args=(str(tmp_path / "init"), out, env), nprocs=2)
    want = [0] * (first - 1) + [signal.SIGTERM] * (tg.STOP_CHECK_STEPS - first + 1)
    assert out[0] == out[1] == want


# -----------------------------
# Checkpoint, SIGTERM, exact resume
# -----------------------------

@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A run checkpointing every step (keeping 3), and a run with the defaults stopped by SIGTERM at step 5 or so,
    then resumed with the command its log gives: (uninterrupted cwd, stopped cwd, the stopped run's return code)."""
    full = tmp_path_factory.mktemp("full")
    run_train(full, data_env(tiny_data, RUN_ID="r", SEED="1", CHECKPOINT_EVERY_SECONDS="1e-9", CHECKPOINT_KEEP="3"))
    cut = tmp_path_factory.mktemp("cut")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1", **data_env(tiny_data, RUN_ID="r", SEED="1"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=cut, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = cut / "logs" / "r.txt"
    while not (log.is_file() and re.search(r"^step:5/", log.read_text(), re.M)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    command = re.search(r"^resume: (.*)$", log.read_text(), re.M).group(1)
    resumed = subprocess.run(["bash", "-c", command], cwd=cut, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return full, cut, rc


@pytest.mark.slow  # the `runs` fixture's two whole runs: keeps the README command under 5 minutes
def test_checkpoints_are_written_every_step_asked_and_only_the_newest_kept(runs):
    full, _, _ = runs
    log = (full / "logs" / "r.txt").read_text()
    assert len(re.findall(r"^checkpoint:\S+ step:\d+ bytes:\d+ time:\d+ms \(not in train_time\)$", log, re.M)) == 30
    assert sorted(p.name for p in (full / "checkpoints" / "r").iterdir()) == [
        "step_0000028.pt", "step_0000029.pt", "step_0000030.pt"]


@pytest.mark.slow  # the `runs` fixture's two whole runs: keeps the README command under 5 minutes
def test_sigterm_checkpoints_and_the_resumed_run_finishes_identically(runs):
    full, cut, rc = runs
    assert rc == 128 + signal.SIGTERM
    log = (cut / "logs" / "r.txt").read_text()
    stop = re.search(r"^stopped:SIGTERM step:(\d+) checkpoint:(\S+)$", log, re.M)
    assert stop and (cut / stop.group(2)).is_file()
    # with the defaults the only checkpoint is the signal's
    assert [p.name for p in (cut / "checkpoints" / "r").iterdir()] == [f"step_{int(stop.group(1)):07d}.pt"]
    assert re.search(rf"^resumed:\S+step_{int(stop.group(1)):07d}.pt step:{stop.group(1)} ", log, re.M)
    reference = (full / "logs" / "r.txt").read_text()
    assert finals(log) and finals(log) == finals(reference)
    resumed_part = log[log.rindex("\nrun_id:"):]
    assert train_losses(resumed_part) == train_losses(reference)[int(stop.group(1)):]
    assert sha256(cut / "final_model.int6.pgolf") == sha256(full / "final_model.int6.pgolf")


@pytest.mark.slow  # the `runs` fixture's two whole runs: keeps the README command under 5 minutes
def test_a_resumed_log_is_read_from_its_last_run_and_fails_the_single_run_check_under_time_limits(runs):
    full, cut, _ = runs
    whole = {c.name.split()[0]: c for c in lp.run_checks(lp.parse_log(full / "logs" / "r.txt"))}
    assert whole["single"].ok
    log = lp.parse_log(cut / "logs" / "r.txt")
    assert log.resumed["step"] > 0 and log.train_steps[0]["step"] == log.resumed["step"] + 1
    checks = {c.name.split()[0]: c for c in lp.run_checks(log)}
    assert not checks["single"].ok and "not a single 600 s run" in checks["single"].detail
    assert {c.name.split()[0]: c for c in lp.run_checks(log, time_limits=False)}["single"].ok


# -----------------------------
# Bad checkpoints
# -----------------------------

@pytest.fixture
def tiny_settings(runs):
    # The subprocess runs' settings, for an in-process read of their checkpoints.
    full, _, _ = runs
    theirs = {}
    for line in (full / "logs" / "r.txt").read_text().splitlines():
        m = re.fullmatch(r"env:([^=]+)=(.*)", line)
        if m:
            theirs[m.group(1)] = m.group(2)
    return theirs


def read_checkpoint(path, settings, world_size=1):
    run = SimpleNamespace(args=tg.Hyperparameters({**settings, "RESUME": str(path)}), world_size=world_size,
                          code=(ROOT / "train_gpt.py").read_bytes())
    return tg.read_checkpoint(run)


@pytest.mark.slow  # the `runs` fixture's two whole runs: keeps the README command under 5 minutes
def test_a_good_checkpoint_reads_and_resume_auto_takes_the_newest(runs, tiny_settings):
    full, _, _ = runs
    path, state = read_checkpoint("auto", {**tiny_settings, "CHECKPOINT_DIR": str(full / "checkpoints" / "r")})
    assert path.name == "step_0000030.pt" and state["step"] == 30
    # what may differ: paths, logging, the cap, the checkpoint settings
    read_checkpoint(path, {**tiny_settings, "TRAIN_LOG_EVERY": "5", "RUN_ID": "other", "MAX_WALLCLOCK_SECONDS": "900"})


@pytest.mark.slow  # the `runs` fixture's two whole runs: keeps the README command under 5 minutes
def test_bad_checkpoints_are_refused_in_one_line(runs, tiny_settings, tmp_path):
    full, _, _ = runs
    good = full / "checkpoints" / "r" / "step_0000030.pt"
    cases = [(tmp_path / "missing.pt", {}, 1, "no such checkpoint file"),
             (good, {"MODEL_DIM": "32", "NUM_HEADS": "2"}, 1, "MODEL_DIM=32 (checkpoint: 64)"),
             (good, {}, 2, "world_size 2 (checkpoint: 1)"),
             ("auto", {"CHECKPOINT_DIR": str(tmp_path)}, 1, "no checkpoint (step_*.pt) in CHECKPOINT_DIR")]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100_000])
    cases.append((truncated, {}, 1, "truncated or corrupt"))
    flipped = bytearray(good.read_bytes())
    flipped[-1000] ^= 1
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    cases.append((tmp_path / "flipped.pt", {}, 1, "truncated or corrupt"))
    for path, env, world_size, message in cases:
        with pytest.raises(tg.ConfigError, match=re.escape(message)) as e:
            read_checkpoint(path, {**tiny_settings, **env}, world_size)
        assert "\n" not in str(e.value)


def test_a_resume_on_other_train_data_is_refused_in_one_line(tmp_path):
    for folder, lengths in (("a", (500, 300)), ("b", (500, 301))):  # b: one shard a token longer
        (tmp_path / folder).mkdir()
        for i, n in enumerate(lengths):
            write_shard(tmp_path / folder / f"fineweb_train_{i:06d}.bin", [j % 100 for j in range(n)])
    settings = {**TINY_ENV, "VOCAB_SIZE": "100"}
    run = SimpleNamespace(args=tg.Hyperparameters({**settings, "DATA_PATH": str(tmp_path / "a")}), world_size=1,
                          code=(ROOT / "train_gpt.py").read_bytes())
    state = {"settings": dict(run.args.settings), "world_size": 1, "code_sha256": tg.code_sha256(run),
             "train_data_sha256": tg.train_data_sha256(run.args.train_files)}
    payload = tg.to_bytes(state)
    path = tmp_path / "step_0000005.pt"
    path.write_bytes(tg.CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    (tmp_path / "a").rename(tmp_path / "moved")  # the same shards in another folder: the same data
    assert read_checkpoint(path, {**settings, "DATA_PATH": str(tmp_path / "moved")})[1] == state
    with pytest.raises(tg.ConfigError) as e:
        read_checkpoint(path, {**settings, "DATA_PATH": str(tmp_path / "b")})
    assert f"train shards of DATA_PATH={tmp_path / 'b'}: names and token counts sha256 " in str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_resume_stops_the_run_with_exit_2(tiny_data, tmp_path):
    proc = run_train(tmp_path, data_env(tiny_data, RESUME=str(tmp_path / "none.pt")), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: RESUME={tmp_path / 'none.pt'}: no such checkpoint file; give a step_*.pt file or RESUME=auto"]


# -----------------------------
# Divergence
# -----------------------------

def test_a_diverged_run_stops_at_the_first_logged_nan_keeps_its_last_good_checkpoint_and_writes_no_artifact(
        tiny_data, tmp_path):
    lrs = {"MATRIX_LR": "1e6", "TIED_EMBED_LR": "1e6", "SCALAR_LR": "1e6"}
    proc = run_train(tmp_path, data_env(tiny_data, RUN_ID="d", CHECKPOINT_EVERY_SECONDS="1e-9", **lrs), check=False)
    assert proc.returncode == tg.EXIT_DIVERGED
    log = (tmp_path / "logs" / "d.txt").read_text()
    losses = re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)
    line = re.search(r"^diverged: train_loss:nan at step:(\d+): the learning rates are likely too high "
                     r"\(matrix:1e\+06 embed:1e\+06 .*\); last good checkpoint:(\S+); no artifact written$", log, re.M)
    assert line and int(line.group(1)) == len(losses) + 1  # stopped at the first non-finite loss (every step logged)
    assert all(float(v) < 100 for _, v in losses)
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "d").iterdir())
    assert (tmp_path / line.group(2)).name == kept[-1] == f"step_{len(losses):07d}.pt"
    assert not list(tmp_path.glob("final_model*"))
