"""Read a train_gpt.py log (logs/<RUN_ID>.txt) into one RunLog, and the per-run checks a reviewer makes.

Shared by freeze.py, verify.py, compare.py and plot.py; nothing runs on import. The log contract is the one
train_gpt.py writes: `key:value` lines, the script's own source between `source_begin` and `source_end`,
one `eval_path:` line per evaluation path it runs on the artifact (legality is read from those names), and the
submission's score on the `submission score:` line, repeated as the very last line.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from significance import mean_std

# -----------------------------
# CHALLENGE RULES
# -----------------------------

CAP_BYTES = 16_000_000  # decimal: counted code bytes + compressed model bytes
TRAIN_LIMIT_MS = 600_000  # the timed training loop, 8xH100
EVAL_LIMIT_MS = 600_000  # all scoring after training
RECORD_TRACK = "track_10min_16mb"
NON_RECORD_TRACK = "track_non_record_16mb"
TRACKS = (RECORD_TRACK, NON_RECORD_TRACK)
RECORD_MIN_SEEDS = 3
# the evaluation paths a log declares ('eval_path:<name> adapts:<0|1> rule:<rule>') before scoring the artifact
SCORE_FIRST = "score_first"  # the only legal rule for a path that adapts on val tokens: score, then update
ROUNDTRIP_PATH = "roundtrip"  # declared under this name, scored as final_<quant>_<compressor>_roundtrip
FINEWEB_MARK = "fineweb10B_"  # the challenge's val shards live under data/datasets/fineweb10B_<tokenizer>/

# env overrides that legitimately differ from seed to seed; every other override is the config itself
PER_RUN_KEYS = frozenset({"SEED", "RUN_ID", "TOKEN_LOSS_PATH"})
# where a machine keeps its data: may differ between seeds run on different machines, never a config change
LOCATION_KEYS = frozenset({"DATA_PATH", "TOKENIZER_PATH"})


class LogError(ValueError):
    """A log that breaks the contract; the message is one line naming the log and what is missing."""


# -----------------------------
# PARSING
# -----------------------------

_NUM = r"([-+0-9.eEinfa]+)"  # floats as Python prints them, nan and inf included
_THROUGHPUT = r"(?: tokens_per_s:\d+(?: mfu:[\d.]+%)?)?"  # since the prefetch/throughput work; older logs lack it
_PATTERNS = {
    "run_id": re.compile(r"run_id:(\S+)"),
    "setting": re.compile(r"setting:([^=]+)=(.*)"),
    "env": re.compile(r"env:([^=]+)=(.*)"),
    "warning": re.compile(r"warning:(.*)"),
    "code": re.compile(r"code_sha256:([0-9a-f]{64}) code_bytes:(\d+) code_path:(.*)"),
    "counted": re.compile(r"code plain_bytes:(\d+) packed_bytes:(\d+) counted:(packed|plain)(?: sha256:([0-9a-f]{64}))?"),
    "counted_file": re.compile(r"counted_code:(\S+)"),
    "versions": re.compile(r"versions (.*)"),
    "hardware": re.compile(r"hardware:(.*) world_size:(\d+) grad_accum_steps:(\d+)"),
    "train_loader": re.compile(r"train_loader:dataset:(\S+) train_shards:(\d+)(?: prefetch_batches:\d+ pinned:[01])?"),
    "val_loader": re.compile(r"val_loader:shards pattern=(.*) tokens:(\d+)"),
    "model_params": re.compile(r"model_params:(\d+)"),
    "eval_path": re.compile(r"eval_path:(\w+) adapts:([01]) rule:(\S+)"),
    "train_step": re.compile(
        rf"step:(\d+)/(\d+) train_loss:{_NUM} train_time:(\d+)ms step_avg:{_NUM}ms{_THROUGHPUT}"),
    "val_step": re.compile(
        rf"step:(\d+)/(\d+) val_loss:{_NUM} val_bpb:{_NUM} train_time:(\d+)ms step_avg:{_NUM}ms"),
    "resumed": re.compile(r"resumed:(.*) step:(\d+) train_time:(\d+)ms switched:(\S+)"),
    "stopping_early": re.compile(r"stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/(\d+)"),
    "train_done": re.compile(rf"train_done steps:(\d+) train_time:(\d+)ms step_avg:{_NUM}ms{_THROUGHPUT}"),
    "peak_memory": re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB"),
    "final_exact": re.compile(rf"final_(\w+)_exact val_loss:{_NUM} val_bpb:{_NUM}"),
    "final": re.compile(rf"final_(\w+) val_loss:{_NUM} val_bpb:{_NUM} eval_time:(\d+)ms"),
    "artifact": re.compile(
        r"artifact:(.*) format:(\S+) model_bytes:(\d+) code_bytes:(\d+) total_bytes:(\d+) cap:(\d+) under_cap:([01])"),
    "token_losses": re.compile(r"token_losses:(.*) count:(\d+)"),
    "submission": re.compile(
        rf"submission score:(\S+) val_loss:{_NUM} val_bpb:{_NUM} total_bytes:(\d+) under_cap:([01]) "
        r"train_time:(\d+)ms eval_time:(\d+)ms"),
}

# lines a complete log must hold, with the text a reader greps for
REQUIRED = {
    "run_id": "run_id:",
    "code": "code_sha256:",
    "versions": "versions ",
    "hardware": "hardware:",
    "source": "source_begin ... source_end",
    "val_loader": "val_loader:",
    "train_done": "train_done",
    "artifact": "artifact:",
    "submission": "submission score:",
}


@dataclass
class RunLog:
    path: Path
    run_id: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    code_sha256: str = ""
    code_bytes: int = 0
    counted_code_bytes: int | None = None  # the packed copy's size when the run counted that (CODE_PACK=1)
    counted_sha256: str = ""  # of the counted file (the counted copy, or the script): what a record folder holds
    counted_file: bytes | None = None  # the counted copy as the log holds it (CODE_PACK=1)
    code_path: str = ""
    source: bytes | None = None  # the script's bytes as the log holds them
    versions: dict[str, str] = field(default_factory=dict)
    hardware: str = ""
    world_size: int = 0
    grad_accum_steps: int = 0
    train_dataset: str = ""
    train_shards: int = 0
    val_pattern: str = ""
    val_tokens: int = 0
    model_params: int = 0
    train_steps: list[dict] = field(default_factory=list)  # step, total, train_loss, train_time_ms
    val_steps: list[dict] = field(default_factory=list)  # step, total, val_loss, val_bpb, train_time_ms
    resumed: dict | None = None  # checkpoint, step, train_time_ms: the run continued an interrupted one (RESUME)
    stopping_early: dict | None = None
    train_done: dict = field(default_factory=dict)  # steps, train_time_ms, step_avg_ms
    peak_memory_mib: tuple[int, int] | None = None
    finals: dict[str, dict] = field(default_factory=dict)  # what -> val_loss, val_bpb, eval_time_ms
    finals_exact: dict[str, dict] = field(default_factory=dict)  # what -> val_loss, val_bpb (8 decimals)
    eval_paths: dict[str, dict] = field(default_factory=dict)  # declared name -> adapts, rule
    artifact: dict = field(default_factory=dict)  # path, format, model/code/total bytes, cap, under_cap
    artifact_scores: list[str] = field(default_factory=list)  # the final_<what> lines after 'artifact:', in order
    token_losses: dict | None = None  # path, count
    submission: dict = field(default_factory=dict)  # what, val_loss, val_bpb, total_bytes, under_cap, times
    last_line: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int | None:
        value = self.settings.get("SEED")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def smoke(self) -> bool:
        return _truthy(self.settings.get("SMOKE", "0"))

    @property
    def fineweb_val(self) -> bool:
        return FINEWEB_MARK in self.val_pattern

    @property
    def adapting_paths(self) -> dict[str, str]:
        """The declared paths that adapt on val tokens, name -> their declared rule."""
        return {name: p["rule"] for name, p in self.eval_paths.items() if p["adapts"]}

    @property
    def config_env(self) -> dict[str, str]:
        """The overrides that define the config: all launch overrides but the per-run ones."""
        return {k: v for k, v in self.env.items() if k not in PER_RUN_KEYS}


def _truthy(value: str) -> bool:
    """A boolean setting as a log prints it: 1/0 from the env, or True/False as Python resolved it."""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _split_source(raw: bytes, sha: str, nbytes: int) -> tuple[bytes | None, bytes, bytes]:
    """(source, text before, text after) for the source block; the source is the span whose sha256 matches."""
    if raw.startswith(b"source_begin\n"):
        begin = 0
    else:
        begin = raw.find(b"\nsource_begin\n")
        if begin < 0:
            return None, raw, b""
        begin += 1
    start = begin + len(b"source_begin\n")
    ends, pos = [], start
    while True:  # every line 'source_end' after the start: the source itself may hold such a line
        pos = raw.find(b"source_end", pos)
        if pos < 0:
            break
        at_line_start = pos == start or raw[pos - 1:pos] == b"\n"
        after = raw[pos + len(b"source_end"):pos + len(b"source_end") + 1]
        if at_line_start and after in (b"\n", b""):
            ends.append(pos)
        pos += 1
    if not ends:
        return None, raw[:begin], b""
    fallback = None
    for end in ends:
        # the script's last newline is its own; a logger may add one more before 'source_end'
        for candidate in (raw[start:end], raw[start:end - 1] if end > start else None):
            if candidate is None:
                continue
            if hashlib.sha256(candidate).hexdigest() == sha:
                return candidate, raw[:begin], raw[end:]
            if fallback is None and len(candidate) == nbytes:
                fallback = (candidate, raw[:begin], raw[end:])
    if fallback is not None:
        return fallback
    return raw[start:ends[0]], raw[:begin], raw[ends[0]:]


def _float(text: str, path: Path, line: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LogError(f"{path}: unreadable number {text!r} in line {line!r}") from None


def parse_log(path: str | Path) -> RunLog:
    """Parse one log; raise LogError (one line, naming the log and the line) when a required line is missing."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LogError(f"{path}: cannot read the log ({exc.strerror})") from None
    log = RunLog(path=path)
    # A resumed run appends to the interrupted run's log: it is read from its own 'run_id:' line on.
    starts = [m.start() for m in re.finditer(rb"^run_id:", raw, re.M)]
    if len(starts) > 1 and re.search(rb"^resumed:", raw[starts[-1]:], re.M):
        raw = raw[starts[-1]:]
    code = _PATTERNS["code"].search(raw.split(b"source_begin", 1)[0].decode("utf-8", "replace"))
    sha, nbytes = (code.group(1), int(code.group(2))) if code else ("", -1)
    source, before, after = _split_source(raw, sha, nbytes)
    log.source = source
    found = set() if source is None else {"source"}
    lines = [ln.rstrip("\r") for ln in (before + after).decode("utf-8", "replace").split("\n")]
    lines = [ln for ln in lines if ln and ln not in ("source_begin", "source_end")]
    log.last_line = lines[-1] if lines else ""
    for line in lines:
        for key in ("run_id", "setting", "env", "warning", "code", "counted", "counted_file", "versions", "hardware",
                    "train_loader", "val_loader", "model_params", "eval_path", "resumed", "train_step", "val_step", "stopping_early",
                    "train_done", "peak_memory", "final_exact", "final", "artifact", "token_losses", "submission"):
            m = _PATTERNS[key].fullmatch(line)
            if m:
                found.add(key)
                _store(log, key, m, line)
                break
    for key, text in REQUIRED.items():
        if key not in found:
            raise LogError(f"{path}: missing line '{text}'")
    runs = sum(1 for line in lines if line.startswith("run_id:"))
    if runs > 1:  # train_gpt.py appends: a reused RUN_ID puts two runs in one file
        raise LogError(f"{path}: holds {runs} runs (lines 'run_id:'); a RUN_ID was reused, keep one run per log")
    return log


def _store(log: RunLog, key: str, m: re.Match, line: str) -> None:
    g, f = m.groups(), (lambda s: _float(s, log.path, line))
    if key == "run_id":
        log.run_id = g[0]
    elif key == "setting":
        log.settings[g[0]] = g[1]
    elif key == "env":
        log.env[g[0]] = g[1]
    elif key == "warning":
        log.warnings.append(g[0])
    elif key == "code":
        log.code_sha256, log.code_bytes, log.code_path = g[0], int(g[1]), g[2]
    elif key == "counted":
        log.counted_code_bytes = int(g[1] if g[2] == "packed" else g[0])
        log.counted_sha256 = g[3] or ""
    elif key == "counted_file":
        log.counted_file = base64.b85decode(g[0])
    elif key == "versions":
        log.versions = dict(re.findall(r"(\w+):(\S+)", g[0]))
    elif key == "hardware":
        log.hardware, log.world_size, log.grad_accum_steps = g[0], int(g[1]), int(g[2])
    elif key == "train_loader":
        log.train_dataset, log.train_shards = g[0], int(g[1])
    elif key == "val_loader":
        log.val_pattern, log.val_tokens = g[0], int(g[1])
    elif key == "model_params":
        log.model_params = int(g[0])
    elif key == "eval_path":
        log.eval_paths[g[0]] = {"adapts": g[1] == "1", "rule": g[2]}
    elif key == "train_step":
        log.train_steps.append({"step": int(g[0]), "total": int(g[1]), "train_loss": f(g[2]),
                                "train_time_ms": int(g[3])})
    elif key == "val_step":
        log.val_steps.append({"step": int(g[0]), "total": int(g[1]), "val_loss": f(g[2]), "val_bpb": f(g[3]),
                              "train_time_ms": int(g[4])})
    elif key == "resumed":
        log.resumed = {"checkpoint": g[0], "step": int(g[1]), "train_time_ms": int(g[2])}
    elif key == "stopping_early":
        log.stopping_early = {"train_time_ms": int(g[0]), "step": int(g[1]), "total": int(g[2])}
    elif key == "train_done":
        log.train_done = {"steps": int(g[0]), "train_time_ms": int(g[1]), "step_avg_ms": f(g[2])}
    elif key == "peak_memory":
        log.peak_memory_mib = (int(g[0]), int(g[1]))
    elif key == "final_exact":
        log.finals_exact[g[0]] = {"val_loss": f(g[1]), "val_bpb": f(g[2])}
    elif key == "final":
        log.finals[g[0]] = {"val_loss": f(g[1]), "val_bpb": f(g[2]), "eval_time_ms": int(g[3])}
        if log.artifact:  # scored after the artifact was written: a path on the artifact, not a training stage
            log.artifact_scores.append(g[0])
    elif key == "artifact":
        log.artifact = {"path": g[0], "format": g[1], "model_bytes": int(g[2]), "code_bytes": int(g[3]),
                        "total_bytes": int(g[4]), "cap": int(g[5]), "under_cap": g[6] == "1"}
    elif key == "token_losses":
        log.token_losses = {"path": g[0], "count": int(g[1])}
    elif key == "submission":
        log.submission = {"what": g[0], "val_loss": f(g[1]), "val_bpb": f(g[2]), "total_bytes": int(g[3]),
                          "under_cap": g[4] == "1", "train_time_ms": int(g[5]), "eval_time_ms": int(g[6])}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -----------------------------
# PER-RUN CHECKS
# -----------------------------

@dataclass
class Check:
    name: str  # what is checked, e.g. "train time"
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def reported_train_time_ms(log: RunLog) -> int:
    """The longest training time the log reports anywhere: a planted or inconsistent figure cannot hide."""
    times = [log.train_done["train_time_ms"], log.submission["train_time_ms"]]
    if log.stopping_early:
        times.append(log.stopping_early["train_time_ms"])
    return max(times)


def reported_eval_time_ms(log: RunLog) -> int:
    """The submission line's total scoring time, or the sum of the per-path times if that is larger."""
    return max(log.submission["eval_time_ms"], sum(v["eval_time_ms"] for v in log.finals.values()))


def counted_file(log: RunLog) -> bytes | None:
    """The file the artifact's code bytes count, as the log holds it: the counted copy (CODE_PACK=1) or the source."""
    return log.source if log.counted_file is None else log.counted_file


def _le(value: float, limit: float) -> str:
    return "<=" if value <= limit else ">"


def run_checks(log: RunLog, time_limits: bool = True) -> list[Check]:
    """What a reviewer checks in one log alone: self-consistency, the cap and the time limits."""
    sub, art, tag = log.submission, log.artifact, log.name
    checks = []
    src_sha = sha256_bytes(log.source) if log.source is not None else ""
    # the file that ran is in the log: its source, or (a run of a counted copy) the counted copy itself
    ran = log.counted_file if src_sha != log.code_sha256 and log.counted_sha256 == log.code_sha256 else log.source
    checks.append(Check(
        f"log source {tag}", ran is not None and sha256_bytes(ran) == log.code_sha256 and len(ran) == log.code_bytes,
        f"embedded source sha256 {src_sha[:12]} ({len(log.source or b'')} bytes), "
        f"code_sha256 {log.code_sha256[:12]} ({log.code_bytes} bytes)"))
    if log.counted_sha256:  # logs since the counted copy name the counted file's hash
        counted = counted_file(log) or b""
        checks.append(Check(
            f"counted file {tag}", sha256_bytes(counted) == log.counted_sha256 and len(counted) == log.counted_code_bytes,
            f"the log's counted file: sha256 {sha256_bytes(counted)[:12]} ({len(counted)} bytes); logged "
            f"{log.counted_sha256[:12]} ({log.counted_code_bytes} bytes)"))
    total_ok = art["total_bytes"] == art["model_bytes"] + art["code_bytes"] == sub["total_bytes"]
    checks.append(Check(
        f"size sums {tag}", total_ok,
        f"model {art['model_bytes']} + code {art['code_bytes']} = {art['model_bytes'] + art['code_bytes']}; "
        f"artifact total {art['total_bytes']}, submission total {sub['total_bytes']}"))
    counted = log.code_bytes if log.counted_code_bytes is None else log.counted_code_bytes
    checks.append(Check(
        f"counted code {tag}", art["code_bytes"] == counted,
        f"artifact counts {art['code_bytes']} code bytes; the script that ran has {log.code_bytes}, "
        f"its counted form {counted}"))
    biggest = max(art["total_bytes"], sub["total_bytes"])
    checks.append(Check(
        f"cap {tag}", biggest <= CAP_BYTES and art["cap"] == CAP_BYTES,
        f"{biggest:,} bytes {_le(biggest, CAP_BYTES)} {CAP_BYTES:,} (log's cap {art['cap']:,}, "
        f"{CAP_BYTES - biggest:+,} bytes of headroom)"))
    train_ms, eval_ms = reported_train_time_ms(log), reported_eval_time_ms(log)
    paths_ms = sum(v["eval_time_ms"] for v in log.finals.values())
    consistent = (log.train_done["train_time_ms"] == sub["train_time_ms"]
                  and paths_ms <= sub["eval_time_ms"] + len(log.finals) + 1)  # 1 ms rounding per path
    checks.append(Check(
        f"time figures {tag}", consistent,
        f"train_done {log.train_done['train_time_ms']}ms vs submission {sub['train_time_ms']}ms; "
        f"eval paths sum {paths_ms}ms vs submission total {sub['eval_time_ms']}ms"))
    limit = "" if time_limits else " (limit not enforced)"
    checks.append(Check(f"train time {tag}", train_ms <= TRAIN_LIMIT_MS or not time_limits,
                        f"{train_ms / 1000:.3f} s {_le(train_ms, TRAIN_LIMIT_MS)} {TRAIN_LIMIT_MS / 1000:.0f} s{limit}"))
    checks.append(Check(f"eval time {tag}", eval_ms <= EVAL_LIMIT_MS or not time_limits,
                        f"{eval_ms / 1000:.3f} s {_le(eval_ms, EVAL_LIMIT_MS)} {EVAL_LIMIT_MS / 1000:.0f} s{limit}"))
    resumed = log.resumed
    checks.append(Check(
        f"single run {tag}", resumed is None or not time_limits,
        "one uninterrupted run" if resumed is None else
        f"resumed from {resumed['checkpoint']} at step {resumed['step']}: not a single 600 s run{limit}"))
    exact = log.finals_exact.get(sub["what"])
    last = _PATTERNS["final_exact"].fullmatch(log.last_line)
    score_ok = (exact is not None and last is not None and last.group(1) == sub["what"]
                and abs(exact["val_loss"] - sub["val_loss"]) <= 5e-9
                and abs(exact["val_bpb"] - sub["val_bpb"]) <= 5e-9)
    checks.append(Check(
        f"score line {tag}", score_ok,
        f"submission {sub['what']} val_loss {sub['val_loss']:.8f} val_bpb {sub['val_bpb']:.8f}; "
        f"last line {log.last_line!r}"))
    val_docs = log.settings.get("VAL_DOCS", "0")
    checks.append(Check(f"whole val split {tag}", val_docs == "0",
                        "every val document scored" if val_docs == "0" else
                        f"VAL_DOCS={val_docs}: only a prefix of the val split was scored, not a submission score"))
    checks.append(eval_path_check(log))
    return checks


def declared_name(what: str) -> str:
    """The eval_path a final_<what> line scores: the roundtrip is declared as such, scored under its format."""
    return ROUNDTRIP_PATH if what.endswith("_roundtrip") else what


def eval_path_check(log: RunLog) -> Check:
    """Legality from the declared paths: each that adapts on val tokens is score-first; declared == scored."""
    name = f"eval paths {log.name}"
    if not log.eval_paths:
        return Check(name, False, "no 'eval_path:' lines, so which scoring paths adapt on val tokens cannot be "
                                  "read; the log predates declared evaluation paths: re-run with the current "
                                  "train_gpt.py")
    problems = []
    unruled = [f"{n} (rule:{rule})" for n, rule in log.adapting_paths.items() if rule != SCORE_FIRST]
    if unruled:
        problems.append(f"adapts on val tokens without rule:{SCORE_FIRST}: {', '.join(unruled)}")
    scored = {declared_name(w) for w in log.artifact_scores}
    unscored = [n for n in log.eval_paths if n not in scored]
    if unscored:
        problems.append(f"declared but never scored (no final_<name> line): {', '.join(unscored)}")
    undeclared = [f"final_{w}" for w in log.artifact_scores if declared_name(w) not in log.eval_paths]
    if undeclared:
        problems.append(f"scored on the artifact but not declared: {', '.join(undeclared)}")
    declared = ", ".join(f"{n} adapts:{int(p['adapts'])} rule:{p['rule']}" for n, p in log.eval_paths.items())
    return Check(name, not problems, "; ".join(problems + [f"declared {declared}"]))


def score_first_ttt(log: RunLog) -> bool:
    """A path adapted on val tokens, and the declarations hold: every adapting path score-first, all scored."""
    return bool(log.adapting_paths) and eval_path_check(log).ok


def compliance(logs: list[RunLog]) -> dict:
    """The compliance flags submission.json records, read from the logs."""
    return {
        "train_time_le_600s": all(reported_train_time_ms(g) <= TRAIN_LIMIT_MS for g in logs),
        "eval_time_le_600s": all(reported_eval_time_ms(g) <= EVAL_LIMIT_MS for g in logs),
        "artifact_le_cap": all(max(g.artifact["total_bytes"], g.submission["total_bytes"]) <= CAP_BYTES
                               for g in logs),
        "cap_bytes": CAP_BYTES,
        "max_train_time_ms": max(reported_train_time_ms(g) for g in logs),
        "max_eval_time_ms": max(reported_eval_time_ms(g) for g in logs),
        "score_first_ttt": all(score_first_ttt(g) for g in logs),
        "adapting_eval_paths": sorted({n for g in logs for n in g.adapting_paths}),
        "num_seeds": len(logs),
        "fineweb_val": all(g.fineweb_val for g in logs),
        "smoke": any(g.smoke for g in logs),
    }


def honest_record_problem(logs: list[RunLog]) -> str | None:
    """Why these logs may not live under records/track_*, or None: only real FineWeb val runs, never smoke."""
    for g in logs:
        if g.smoke:
            return f"{g.path} is a SMOKE=1 run"
        if not g.fineweb_val:
            return f"{g.path} scored val data {g.val_pattern!r}, not the FineWeb val split ({FINEWEB_MARK}...)"
    return None


def seed_summary(logs: list[RunLog]) -> dict:
    """The seeds' submission scores: their means and sample stds (n - 1), the figures submission.json states."""
    loss_mean, loss_std = mean_std([g.submission["val_loss"] for g in logs])
    bpb_mean, bpb_std = mean_std([g.submission["val_bpb"] for g in logs])
    return {"val_loss": loss_mean, "val_bpb": bpb_mean, "val_loss_std": loss_std, "val_bpb_std": bpb_std}


def under_records_track(folder: Path, records_dir: Path) -> bool:
    """Whether folder lies under records_dir/track_*: where only honest record runs may live."""
    try:
        rel = folder.resolve().relative_to(records_dir.resolve())
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0].startswith("track_")


def config_mismatch(logs: list[RunLog]) -> str | None:
    """Why these logs are not seeds of one config (same code, same overrides), or None."""
    first = logs[0]
    for g in logs[1:]:
        if g.code_sha256 != first.code_sha256:
            return f"{g.path} ran code {g.code_sha256[:12]}, {first.path} ran {first.code_sha256[:12]}"
        a = {k: v for k, v in first.config_env.items() if k not in LOCATION_KEYS}
        b = {k: v for k, v in g.config_env.items() if k not in LOCATION_KEYS}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return (f"env override {key} is {a.get(key)!r} in {first.path} "
                        f"but {b.get(key)!r} in {g.path}")
    return None


def common_env(logs: list[RunLog]) -> dict[str, str]:
    """The overrides every seed shares (per-run keys excluded): what reproduces the config."""
    env = dict(logs[0].config_env)
    for g in logs[1:]:
        env = {k: v for k, v in env.items() if g.config_env.get(k) == v}
    return dict(sorted(env.items()))


# -----------------------------
# COMMAND LINE
# -----------------------------

def run_command(prog: str, action, errors: tuple[type[BaseException], ...]) -> int:
    """The tools' exit contract: action() returns the line to print (exit 0); one of `errors` is bad input,
    printed as one line `<prog>: error: ...` on stderr (exit 2)."""
    try:
        done = action()
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(done)
    return 0
