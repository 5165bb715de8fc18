"""Shared fixtures and helpers: a tiny model config, a tiny dataset built from the embedded corpus, a runner for
train_gpt.py subprocesses and readers of its log."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

# Two cores, small ops and two-process tests: one intra-op thread per process (subprocess runs inherit it) runs the
# suite in 4.5 minutes here instead of 8.5 with torch's default of one per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT / "records"))

import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on 2 cores; out of the README's test command, run by "
                                       "`python3 -m pytest -q -m slow tests`")
# The in-process tests' model: the starter's options at a tiny shape; each test adds what it studies.
TINY_MODEL = {"BASELINE": "1", "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"}


def tiny_args(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({**TINY_MODEL, **{k: str(v) for k, v in env.items()}})


def train_losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]


def exact_line(log: str, what: str) -> str:
    return re.search(rf"^final_{what}_exact val_loss:\S+ val_bpb:\S+$", log, re.M).group(0)


# A model small enough that a full run (train, export, two evaluations) takes seconds on 2 cores.
TINY_ENV = {
    "VOCAB_SIZE": "384", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "2048", "VAL_BATCH_SIZE": "16384", "ITERATIONS": "30",
    "WARMDOWN_ITERS": "10", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "1", "MUON_MOMENTUM_WARMUP_STEPS": "10",
    "PHASED_TTT_ENABLED": "0",  # the recipe's evaluation takes minutes here: the tests that study it switch it on
    "QUANT_FLOAT_MAX": "4096",  # at the records' 65,536 no matrix of this model is quantized
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_path, tokenizer_path): embedded-corpus shards with a 384-piece tokenizer and a small val split."""
    from build_shards import build, embedded_documents

    out = tmp_path_factory.mktemp("tiny_data")
    docs = embedded_documents()[:400]
    build(docs, out / "ds", out / "tok.model", vocab_size=384, train_tokenizer=True, val_docs=40,
                       log=lambda *a, **k: None)
    return out / "ds", out / "tok.model"


def run_train(cwd, env_extra, nproc=1, check=True, timeout=300):
    """Run train_gpt.py in cwd with the tiny settings plus env_extra; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SMOKE")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1", **env_extra)
    script = str(ROOT / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_gpt.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def data_env(tiny_data, **extra):
    data_path, tok = tiny_data
    return {"DATA_PATH": str(data_path), "TOKENIZER_PATH": str(tok), **extra}


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One finished tiny run: (cwd, log text, token-loss path)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    run_train(cwd, data_env(tiny_data, RUN_ID="tiny", SEED="1", TOKEN_LOSS_PATH=str(cwd / "losses.npy")))
    return cwd, (cwd / "logs" / "tiny.txt").read_text(), cwd / "losses.npy"


# The 1.0611 record's script (openai/parameter-golf #1855, MIT) as a test oracle: ../shared/reference, where present.
REFERENCE = ROOT.parent / "shared" / "reference"


def require_reference(path: Path) -> None:
    """Equivalence tests need the records' scripts at `path`. Where CI=true or REQUIRE_REFERENCE=1 (CI has them),
    a missing one fails the test; elsewhere it skips, with a warning in the summary: equivalence NOT checked."""
    if path.exists():
        return
    msg = f"REFERENCE MISSING: {path} is absent, equivalence with the records NOT checked (see ../shared/reference)"
    if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_REFERENCE") == "1":
        pytest.fail(msg)
    warnings.warn(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def pr1855():
    """The record's train_gpt.py imported once per process as module `pr1855_train_gpt` (its fused cross-entropy
    registers a torch.library op, which a second import would redefine), with the reference's FA3 stand-in on
    sys.path and its Triton cross-entropy off; skips where ../shared/reference is absent. Its Hyperparameters reads
    the environment when the module is imported: change a setting on an instance (pr1855_settings)."""
    import importlib.util

    path = REFERENCE / "pr1855" / "train_gpt.py"
    require_reference(path)
    if "pr1855_train_gpt" not in sys.modules:
        os.environ.setdefault("FUSED_CE_ENABLED", "0")
        sys.path.append(str(REFERENCE))  # flash_attn_interface.py only; never pr1855/ (its train_gpt would shadow ours)
        spec = importlib.util.spec_from_file_location("pr1855_train_gpt", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        module.BOS_ID = tg.BOS_ID  # set by its main() from the tokenizer; the same id as ours
    return sys.modules["pr1855_train_gpt"]


def pr1855_settings(module, **settings):
    """The record's Hyperparameters with attributes overridden (lower-case names, e.g. num_layers=2)."""
    h = module.Hyperparameters()
    for name, value in settings.items():
        assert hasattr(h, name), f"the record has no setting {name}"
        setattr(h, name, value)
    return h


def pr1855_model(module, h):
    """The record's GPT for settings h, in float32 on the CPU, its Triton LeakyReLU^2 MLP off."""
    model = module.GPT(h)
    for m in model.modules():
        if isinstance(m, module.MLP):
            m.use_fused = False
    return model


@pytest.fixture(scope="session")
def pr2014():
    """#2014's train_gpt.py (openai/parameter-golf, the clean frontier, MIT) as module `pr2014_train_gpt`, as pr1855:
    its fused cross-entropy's torch.library name renamed, since #1855's script registers the same one; skips where
    ../shared/reference is absent. Its GPT reads ASYM_LOGIT_RESCALE from the environment when it is built."""
    import importlib.util

    path = REFERENCE / "pr2014" / "train_gpt.py"
    require_reference(path)
    if "pr2014_train_gpt" not in sys.modules:
        os.environ.setdefault("FUSED_CE_ENABLED", "0")
        if str(REFERENCE) not in sys.path:
            sys.path.append(str(REFERENCE))
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("pr2014_train_gpt", path))
        sys.modules[module.__name__] = module
        source = path.read_text().replace("pgsubmission1draft7fusedce", "pgsubmission1draft7fusedce_pr2014")
        exec(compile(source, str(path), "exec"), module.__dict__)  # same lines: inspect.getsource reads the file
        module.BOS_ID = tg.BOS_ID
    return sys.modules["pr2014_train_gpt"]


@pytest.fixture(scope="session")
def pr1520():
    """#1520's decoded train_gpt.py (openai/parameter-golf, MIT; ../shared/reference/pr1520) as module
    `reference_pr1520`, imported by the reference's own loader; skips where ../shared/reference is absent. Its model
    reads USE_* switches from the environment when built, its Muon when it steps."""
    require_reference(REFERENCE / "pr1520" / "train_gpt.py")
    if str(REFERENCE) not in sys.path:
        sys.path.append(str(REFERENCE))
    from load_reference import load
    return load("pr1520")
