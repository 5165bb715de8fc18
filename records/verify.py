"""Check a record folder the way a reviewer does, and optionally re-run it.

    python3 records/verify.py records/track_10min_16mb/2026-04-01_Name --best-val-loss 2.0
    python3 records/verify.py FOLDER --rule welch --previous-seeds records/track_10min_16mb/<previous>/submission.json
    python3 records/verify.py FOLDER --rerun --env DATA_PATH=/data/fineweb10B_sp1024 --env TOKENIZER_PATH=...

Prints one line per check, PASS or FAIL (NOTE and SKIP lines inform), then a summary.
Exit codes: 0 every check passed, 1 a check failed, 2 bad input (no such folder, a malformed option).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import logparse as lp
import significance as sig
from logparse import Check

RECORDS_DIR = Path(__file__).resolve().parent
REQUIRED_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total",
                   "bytes_code", "track", "seeds", "seed_results")
SCORE_TOL = 5e-9  # the logs print 8 decimals


class Report:
    def __init__(self, out=None):
        self.checks: list[Check] = []
        self.out = out  # None: sys.stdout as it is when printing

    def add(self, name: str, ok: bool, detail: str) -> bool:
        return self.extend([Check(name, bool(ok), detail)])

    def extend(self, checks: list[Check]) -> bool:
        for c in checks:
            self.checks.append(c)
            print(c.line(), file=self.out, flush=True)
        return all(c.ok for c in checks)

    def note(self, kind: str, text: str) -> None:
        print(f"{kind} {text}", file=self.out, flush=True)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _close(a, b, tol: float) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol


# -----------------------------
# FOLDER CHECKS
# -----------------------------

def verify_folder(folder: Path, rep: Report, significance: dict | None = None, time_limits: bool = True,
                  records_dir: Path | None = None) -> tuple[dict | None, list[lp.RunLog]]:
    """Run every check on the folder; return (submission, logs) for a re-run, or (None, []) when unreadable."""
    records_dir = records_dir or RECORDS_DIR
    missing = [n for n in ("README.md", "submission.json", "train_gpt.py") if not (folder / n).is_file()]
    rep.add("files", not missing, f"missing {', '.join(missing)}" if missing
            else "README.md, submission.json, train_gpt.py present")
    if "submission.json" in missing or "train_gpt.py" in missing:
        return None, []
    try:
        sub = json.loads((folder / "submission.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        rep.add("submission.json", False, f"not valid JSON ({exc})")
        return None, []
    if not isinstance(sub, dict) or not all(isinstance(r, dict) for r in sub.get("seed_results") or []):
        rep.add("submission.json", False, "not an object with a list of seed_results objects")
        return None, []
    absent = [k for k in REQUIRED_FIELDS if k not in sub]
    rep.add("submission.json", not absent, f"missing fields {', '.join(absent)}" if absent
            else f"all of {len(REQUIRED_FIELDS)} required fields present")
    if not isinstance(sub.get("seed_results"), list) or not sub["seed_results"]:
        rep.add("seed results", False, "submission.json lists no seed_results")
        return None, []

    code = (folder / "train_gpt.py").read_bytes()
    code_sha = lp.sha256_bytes(code)
    logs: list[lp.RunLog] = []
    results: list[dict] = []
    for r in sub["seed_results"]:
        name = r.get("log", "")
        try:
            logs.append(lp.parse_log(folder / name))
            results.append(r)
        except lp.LogError as exc:
            rep.add(f"log {name or '?'}", False, str(exc))
    listed = {r.get("log") for r in sub["seed_results"]}
    stray = sorted(p.name for p in folder.glob("*.log") if p.name not in listed)
    rep.add("logs", not stray and len(logs) == len(sub["seed_results"]),
            f"{len(logs)} of {len(sub['seed_results'])} listed logs readable"
            + (f"; unlisted logs in the folder: {', '.join(stray)}" if stray else ""))
    if not logs:
        return None, []

    # the code: train_gpt.py is the file every log counted (its counted copy, or the script that ran)
    for g in logs:
        sha, size = (g.counted_sha256, g.counted_code_bytes) if g.counted_sha256 else (g.code_sha256, g.code_bytes)
        rep.add(f"code hash {g.name}", sha == code_sha and size == len(code),
                f"log counted {sha[:16]} ({size} bytes), folder train_gpt.py {code_sha[:16]} ({len(code)} bytes)")
    for g in logs:
        rep.extend(lp.run_checks(g, time_limits=time_limits))
        for w in g.warnings:
            rep.note("NOTE", f"{g.name} warning:{w}")

    # sizes as submission.json states them
    biggest = max(g.submission["total_bytes"] for g in logs)
    sub_total, sub_code = sub.get("bytes_total"), sub.get("bytes_code")
    rep.add("bytes_total", sub_total == biggest and isinstance(sub_total, int) and sub_total <= lp.CAP_BYTES,
            f"submission.json {sub_total}, largest log total {biggest:,}, cap {lp.CAP_BYTES:,}")
    rep.add("bytes_code", sub_code == len(code) and all(g.artifact["code_bytes"] == len(code) for g in logs),
            f"submission.json {sub_code}, train_gpt.py {len(code)}, logs count "
            f"{sorted({g.artifact['code_bytes'] for g in logs})}")

    # scores as submission.json states them
    for r, g in zip(results, logs):
        s = g.submission
        bad = [k for k, want in (("seed", g.seed), ("score_path", s["what"]), ("bytes_total", s["total_bytes"]),
                                 ("train_time_ms", s["train_time_ms"]), ("eval_time_ms", s["eval_time_ms"]))
               if k in r and r[k] != want]
        bad += [k for k in ("val_loss", "val_bpb") if not _close(r.get(k), s[k], SCORE_TOL)]
        rep.add(f"scores {g.name}", not bad,
                f"log val_loss {s['val_loss']:.8f} val_bpb {s['val_bpb']:.8f}; submission.json "
                f"{r.get('val_loss')} / {r.get('val_bpb')}" + (f"; disagree: {', '.join(bad)}" if bad else ""))
    want = lp.seed_summary(logs)
    present = [k for k in want if k in sub or k in ("val_loss", "val_bpb")]  # the stds are optional
    bad = [k for k in present if not _close(sub.get(k), want[k], 1e-8)]
    rep.add("mean scores", not bad,
            f"logs: val_loss {want['val_loss']:.8f} ± {want['val_loss_std']:.8f}, "
            f"val_bpb {want['val_bpb']:.8f} ± {want['val_bpb_std']:.8f}; "
            f"submission.json val_loss {sub.get('val_loss')}, val_bpb {sub.get('val_bpb')}"
            + (f"; disagree: {', '.join(bad)}" if bad else ""))

    # seeds and config
    seeds = [g.seed for g in logs]
    record_track = sub.get("track") == lp.RECORD_TRACK
    enough = len(set(seeds)) >= lp.RECORD_MIN_SEEDS or not record_track
    rep.add("seeds", sub.get("seeds") == seeds and len(set(seeds)) == len(seeds) and enough,
            f"logs ran SEED {seeds}, submission.json lists {sub.get('seeds')}"
            + ("" if enough else f"; a record needs {lp.RECORD_MIN_SEEDS} seeds"))
    mismatch = lp.config_mismatch(logs)
    env = lp.common_env(logs)
    rep.add("config", mismatch is None and sub.get("env", env) == env,
            mismatch or f"one code, one set of overrides: {env or 'none'}"
            + ("" if sub.get("env", env) == env else f"; submission.json env {sub.get('env')} differs"))
    flags = lp.compliance(logs)
    stated = sub.get("compliance", {})
    lies = [k for k, v in flags.items() if k in stated and stated[k] != v]
    rep.add("compliance flags", not lies, "submission.json's flags match the logs" if not lies
            else "submission.json's flags disagree with the logs: "
            + ", ".join(f"{k} {stated[k]} vs {flags[k]}" for k in lies))

    # the record track: real FineWeb runs on the challenge's hardware
    problem = lp.honest_record_problem(logs)
    if record_track or lp.under_records_track(folder, records_dir):
        rep.add("data", problem is None, problem or f"FineWeb val ({logs[0].val_pattern}), no SMOKE")
    else:
        rep.add("data", True, (problem or "FineWeb val") + f"; fine for {sub.get('track')} outside records/")
    hardware_ok = all("H100" in g.hardware and g.world_size == 8 for g in logs)
    rep.add("hardware", hardware_ok or not record_track,
            f"{sorted({f'{g.hardware} (world_size {g.world_size})' for g in logs})}"
            + ("" if record_track else f" ({sub.get('track')}: any hardware)")
            + ("" if hardware_ok or not record_track else "; the record track runs on 8xH100"))

    check_significance(rep, sub, logs, **(significance or {}))
    return sub, logs


def check_significance(rep: Report, sub: dict, logs: list[lp.RunLog], rules: list[str] | None = None,
                       best_val_loss: float | None = None, previous_bpbs: list[float] | None = None) -> None:
    """One check per rule (default: each with an input, given here or recorded by freeze), then which pass."""
    recorded = sub.get("significance") or {}
    given = {"readme": best_val_loss, "welch": previous_bpbs}
    stated = {"readme": recorded.get("readme", {}).get("best_val_loss"),
              "welch": recorded.get("welch", {}).get("previous")}
    rules = rules or [r for r in sig.RULES if given[r] is not None or stated[r] is not None]
    if not rules:
        rep.note("SKIP", "significance: no --best-val-loss or --previous-seeds given and none recorded in "
                         "submission.json")
        return
    inputs = {r: stated[r] if given[r] is None else given[r] for r in sig.RULES}
    losses = [g.submission["val_loss"] for g in logs]
    bpbs = [g.submission["val_bpb"] for g in logs]
    passed = {}
    for rule in rules:
        try:
            result = sig.apply_rule(rule, losses, bpbs, inputs["readme"], inputs["welch"])
        except ValueError as exc:
            passed[rule] = rep.add(f"significance {rule}", False, str(exc))
            continue
        passed[rule] = rep.add(f"significance {rule}", result["significant"], sig.describe(result))
        if given[rule] is None:  # the input freeze recorded: its p-value must be what the logs give
            mine = recorded[rule]
            same = (_close(mine.get("p_value"), result["p_value"], 1e-6)
                    and mine.get("significant") == result["significant"])
            rep.add(f"recorded significance {rule}", same,
                    f"submission.json p = {mine.get('p_value')}, recomputed {result['p_value']:.8f}")
    rep.note("INFO", "significance: " + "; ".join(f"{'passes' if ok else 'fails'} {rule}"
                                                   for rule, ok in passed.items()))


# -----------------------------
# RE-RUN
# -----------------------------

def rerun(folder: Path, sub: dict, logs: list[lp.RunLog], rep: Report, seed: int | None,
          extra_env: dict[str, str], nproc: int | None, tolerance: float, time_limits: bool = True) -> None:
    """Run the folder's script from inside the folder with the recorded overrides; compare the new score."""
    by_seed = {g.seed: g for g in logs}
    seed = logs[0].seed if seed is None else seed
    if seed not in by_seed:
        rep.add("rerun", False, f"SEED={seed} is not one of the recorded seeds {sorted(by_seed)}")
        return
    recorded = by_seed[seed]
    run_id = f"rerun_seed{seed}_{time.strftime('%Y%m%d_%H%M%S')}"
    # settings the log resolved but the run did not override come from defaults: drop stray shell values
    env = {k: v for k, v in os.environ.items() if k not in recorded.settings}
    env.update(sub.get("env") or recorded.config_env)
    env.update({"SEED": str(seed), "RUN_ID": run_id})
    for key in sorted(lp.LOCATION_KEYS - set(extra_env) - set(env)):
        # the data's location as the run resolved it, when that absolute path exists here too
        recorded_path = recorded.settings.get(key, "")
        if os.path.isabs(recorded_path) and os.path.exists(recorded_path):
            env[key] = recorded_path
            rep.note("NOTE", f"rerun: {key}={recorded_path} as the recorded run resolved it (--env {key}=... "
                             f"to use another copy)")
    env.update(extra_env)
    nproc = nproc or recorded.world_size
    if nproc > 1:
        torchrun = shutil.which("torchrun")
        launch = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd = launch + ["--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    else:
        cmd = [sys.executable, "train_gpt.py"]
    shown = " ".join(f"{k}={v}" for k, v in env.items()
                     if k in extra_env or k in ("SEED", "RUN_ID") or k in lp.LOCATION_KEYS
                     or k in (sub.get("env") or {}))
    rep.note("INFO", f"rerun: cd {folder} && {shown} {' '.join(cmd)}")
    started = time.time()
    proc = subprocess.run(cmd, cwd=folder, env=env)
    rep.note("INFO", f"rerun: finished in {time.time() - started:.0f} s with exit code {proc.returncode}")
    new_path = folder / "logs" / f"{run_id}.txt"
    if proc.returncode != 0 or not new_path.is_file():
        rep.add("rerun", False, f"exit code {proc.returncode}; log {new_path} "
                                f"{'present' if new_path.is_file() else 'not written'}")
        return
    try:
        new = lp.parse_log(new_path)
    except lp.LogError as exc:
        rep.add("rerun", False, str(exc))
        return
    code_sha = lp.sha256_bytes((folder / "train_gpt.py").read_bytes())
    rep.add(f"code hash {new_path.name}", new.code_sha256 == code_sha,
            f"rerun ran {new.code_sha256[:16]}, folder train_gpt.py {code_sha[:16]}")
    rep.extend(lp.run_checks(new, time_limits=time_limits))
    if new.hardware != recorded.hardware:
        rep.note("NOTE", f"rerun hardware {new.hardware!r} differs from the recorded {recorded.hardware!r}: "
                         f"steps and times are not comparable")
    old, cur = recorded.submission, new.submission
    d_loss, d_bpb = cur["val_loss"] - old["val_loss"], cur["val_bpb"] - old["val_bpb"]
    rep.add("rerun score", abs(d_loss) <= tolerance and cur["what"] == old["what"],
            f"SEED={seed} {cur['what']}: val_loss {cur['val_loss']:.8f} vs recorded {old['val_loss']:.8f} "
            f"({d_loss:+.8f}, tolerance {tolerance}), val_bpb {cur['val_bpb']:.8f} vs {old['val_bpb']:.8f} "
            f"({d_bpb:+.8f}); steps {new.train_done['steps']} vs {recorded.train_done['steps']}; "
            f"log {new_path}")


# -----------------------------
# COMMAND LINE
# -----------------------------

def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check a record folder as a reviewer would.")
    ap.add_argument("folder")
    ap.add_argument("--rule", action="append", choices=sorted(sig.RULES),
                    help="a significance rule to apply (repeatable; default: every rule given its input); "
                    + "; ".join(f"{k}: {v}" for k, v in sig.RULES.items()))
    ap.add_argument("--best-val-loss", type=float,
                    help="the previous record's val_loss (nats), for the readme rule")
    ap.add_argument("--previous-seeds", metavar="BPBS|FILE",
                    help="the previous record's per-seed val_bpb, for the welch rule: 1.0611,1.0608,1.0613, "
                         "a file of numbers, or its submission.json")
    ap.add_argument("--no-time-limits", action="store_true",
                    help="do not fail on the 600 s limits (long runs on the non-record track)")
    ap.add_argument("--rerun", action="store_true", help="also run the folder's train_gpt.py from inside it")
    ap.add_argument("--seed", type=int, help="with --rerun: which recorded seed to re-run (default the first)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="with --rerun: an override to add, e.g. DATA_PATH=... (repeatable)")
    ap.add_argument("--nproc", type=int, help="with --rerun: processes (default: the recorded world_size)")
    ap.add_argument("--tolerance", type=float, default=sig.README_MIN_IMPROVEMENT_NATS,
                    help="with --rerun: largest accepted |val_loss change| in nats (default 0.005)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    try:
        extra_env = parse_env(args.env)
        previous = sig.read_previous_seeds(args.previous_seeds) if args.previous_seeds else None
    except ValueError as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return 2
    if not folder.is_dir():
        print(f"verify: error: {folder} is not a folder", file=sys.stderr)
        return 2
    rep = Report()
    significance = {"rules": args.rule, "best_val_loss": args.best_val_loss, "previous_bpbs": previous}
    sub, logs = verify_folder(folder, rep, significance, time_limits=not args.no_time_limits)
    if args.no_time_limits and sub and sub.get("track") == lp.RECORD_TRACK:
        rep.add("time limits", False, "--no-time-limits is for the non-record track; the record track has them")
    if args.rerun:
        if sub is None:
            rep.add("rerun", False, "the folder is unreadable; nothing to re-run")
        else:
            rerun(folder, sub, logs, rep, args.seed, extra_env, args.nproc, args.tolerance,
                  time_limits=not args.no_time_limits)
    failed = rep.failed
    print(f"verify: {len(rep.checks)} checks, {len(failed)} failed"
          + (f" ({', '.join(c.name for c in failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
