"""Freeze finished runs into a record folder, the way the challenge lays one out.

    python3 records/freeze.py logs/seed1.txt logs/seed2.txt logs/seed3.txt \
        --name "11L int6 TTT" --author "Jane Doe" --github-id janedoe --blurb "..." \
        [--best-val-loss 2.0] [--previous-seeds 1.0611,1.0608,1.0613] [--rule readme|welch]

writes records/track_10min_16mb/YYYY-MM-DD_11L_int6_TTT/ with train_gpt.py (the exact bytes that ran, taken
from the logs), one train_seed<SEED>.log per seed, submission.json and a README.md skeleton. Only real
FineWeb val runs may go under records/track_*; smoke runs and runs on other text are frozen with --out.
Exit codes: 0 written, 2 bad input (one line on stderr saying why), NaN or infinite scores included
(--allow-non-finite freezes them anyway).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import json
import math
import re
import shlex
import sys
from pathlib import Path

import logparse as lp
import plot
import significance as sig

RECORDS_DIR = Path(__file__).resolve().parent
BASE_PACKAGES = frozenset({"torch", "numpy", "sentencepiece"})  # the challenge's environment has these


class FreezeError(Exception):
    pass


# -----------------------------
# BUILDING THE RECORD
# -----------------------------

def load_logs(paths: list[str]) -> list[lp.RunLog]:
    try:
        logs = [lp.parse_log(p) for p in paths]
    except lp.LogError as exc:
        raise FreezeError(str(exc)) from None
    seen: dict[int, Path] = {}
    for g in logs:
        if g.seed is None:
            raise FreezeError(f"{g.path}: missing line 'setting:SEED=...'")
        if g.seed in seen:
            raise FreezeError(f"{g.path} and {seen[g.seed]} both ran SEED={g.seed}; each seed once")
        seen[g.seed] = g.path
        counted = lp.counted_file(g)
        if counted is None or lp.sha256_bytes(counted) != (g.counted_sha256 or g.code_sha256):
            raise FreezeError(f"{g.path}: the counted file the log holds (counted_code: line, or the source between "
                              f"source_begin and source_end) does not hash to the logged sha256; cannot recover it")
    mismatch = lp.config_mismatch(logs)
    if mismatch:
        raise FreezeError(f"the logs are not seeds of one config: {mismatch}")
    return sorted(logs, key=lambda g: g.seed)


def normalize_track(track: str) -> str:
    name = track if track.startswith("track_") else f"track_{track}"
    if name not in lp.TRACKS:
        raise FreezeError(f"unknown track {track!r}; one of {', '.join(lp.TRACKS)}")
    return name


def folder_name(date: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")
    if not slug:
        raise FreezeError(f"--name {name!r} has no letters or digits for a folder name")
    return f"{date}_{slug}"


def launcher(world_size: int) -> str:
    if world_size > 1:
        return f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py"
    return "python3 train_gpt.py"


def env_prefix(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def extra_requirements(source: bytes) -> tuple[list[str], list[str]]:
    """(required, optional) pip lines for the third-party modules the script imports beyond the base set.

    An import inside a try block is an optional fast path with a fallback, so it is listed as a comment.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return [], []
    optional_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for inner in node.body:
                optional_nodes.update(id(n) for n in ast.walk(inner))
    required, optional = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for module in (n.split(".")[0] for n in names):
            if module in sys.stdlib_module_names or module in BASE_PACKAGES or module == "__future__":
                continue
            (optional if id(node) in optional_nodes else required)[module] = True
    distributions = importlib.metadata.packages_distributions()

    def pin(module: str) -> str:
        for dist in distributions.get(module, []):
            try:
                return f"{dist}=={importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                continue
        return module

    req = [pin(m) for m in sorted(required)]
    opt = [pin(m) for m in sorted(optional) if m not in required]
    return req, opt


def build_submission(logs: list[lp.RunLog], args, track: str, date: str) -> dict:
    first = logs[0]
    summary = {k: round(v, 8) for k, v in lp.seed_summary(logs).items()}
    env = lp.common_env(logs)
    submission = {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": date,
        "track": track,
        "val_loss": summary["val_loss"],  # mean over the seeds, nats
        "val_bpb": summary["val_bpb"],
        "val_loss_std": summary["val_loss_std"],  # sample std over the seeds (n - 1)
        "val_bpb_std": summary["val_bpb_std"],
        "bytes_total": max(g.submission["total_bytes"] for g in logs),  # the largest seed's artifact
        "bytes_code": first.artifact["code_bytes"],
        "seeds": [g.seed for g in logs],
        "seed_results": [{
            "seed": g.seed,
            "run_id": g.run_id,
            "log": seed_log_name(g),
            "val_loss": g.submission["val_loss"],
            "val_bpb": g.submission["val_bpb"],
            "score_path": g.submission["what"],
            "bytes_total": g.submission["total_bytes"],
            "bytes_model": g.artifact["model_bytes"],
            "train_time_ms": g.submission["train_time_ms"],
            "eval_time_ms": g.submission["eval_time_ms"],
            "steps": g.train_done["steps"],
            "stopped_early": g.stopping_early is not None,
            "env": g.env,
        } for g in logs],
        "hardware": first.hardware,
        "world_size": first.world_size,
        "torch_version": first.versions.get("torch", ""),
        "python_version": first.versions.get("python", ""),
        "versions": first.versions,
        "code_sha256": first.counted_sha256 or first.code_sha256,  # of train_gpt.py, the counted file
        "score_path": first.submission["what"],
        "run_command": " ".join(filter(None, [env_prefix(env), "SEED=<seed>", launcher(first.world_size)])),
        "env": env,
        "data": {"train_dataset": first.train_dataset, "val_pattern": first.val_pattern,
                 "val_tokens": first.val_tokens},
        "compliance": lp.compliance(logs),
    }
    significance = significance_results(logs, args)
    if significance:
        submission["significance"] = significance
    return submission


def significance_results(logs: list[lp.RunLog], args) -> dict:
    """rule -> its test, for each rule named by --rule, or by default each whose input was given."""
    try:
        previous = sig.read_previous_seeds(args.previous_seeds) if args.previous_seeds else None
    except ValueError as exc:
        raise FreezeError(str(exc)) from None
    given = {"readme": args.best_val_loss, "welch": previous}
    losses = [g.submission["val_loss"] for g in logs]
    bpbs = [g.submission["val_bpb"] for g in logs]
    results = {}
    for rule in args.rule or [r for r in sig.RULES if given[r] is not None]:
        try:
            test = sig.apply_rule(rule, losses, bpbs, args.best_val_loss, previous)
        except ValueError as exc:
            raise FreezeError(str(exc)) from None
        results[rule] = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in test.items()}
    return results


def seed_log_name(log: lp.RunLog) -> str:
    return f"train_seed{log.seed}.log"


def render_readme(sub: dict, logs: list[lp.RunLog], folder_display: str, has_plot: bool) -> str:
    comp, n = sub["compliance"], len(logs)
    tick = lambda ok: "x" if ok else " "  # noqa: E731
    lines = [
        f"# {sub['name']}",
        "",
        f"**val_bpb {sub['val_bpb']:.8f}** (mean of {n} seed{'s' if n > 1 else ''}, std {sub['val_bpb_std']:.8f}; "
        f"val_loss {sub['val_loss']:.8f} nats, std {sub['val_loss_std']:.8f}) · "
        f"bytes_total {sub['bytes_total']:,} (cap {lp.CAP_BYTES:,}) · {sub['hardware']}",
        "",
        sub["blurb"] or "TODO(author): one-paragraph summary.",
        "",
        "## Results",
        "",
        "| seed | run_id | steps | train time | eval time | val_loss | val_bpb | bytes_total |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sub["seed_results"]:
        lines.append(f"| {r['seed']} | {r['run_id']} | {r['steps']}{' (cap)' if r['stopped_early'] else ''} | "
                     f"{r['train_time_ms'] / 1000:.1f} s | {r['eval_time_ms'] / 1000:.1f} s | {r['val_loss']:.8f} | "
                     f"{r['val_bpb']:.8f} | {r['bytes_total']:,} |")
    lines += [
        f"| mean ± std | | | | | {sub['val_loss']:.8f} ± {sub['val_loss_std']:.8f} | "
        f"{sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f} | |",
        "",
        f"Score path: `{sub['score_path']}` (each log's `submission score:` line, repeated as its last line).",
        "",
    ]
    if "significance" in sub:
        tests = sub["significance"]
        lines += ["Against the previous record: " + "; ".join(
            f"{'passes' if t['significant'] else 'FAILS'} `{rule}`" for rule, t in tests.items()) + ".", ""]
        lines += [f"- `{rule}` ({sig.RULES[rule]}): {sig.describe(t)}" for rule, t in tests.items()] + [""]
    if has_plot:
        lines += [f"![train and val curves of every seed]({plot.PLOT_NAME})", ""]
    lines += [
        "## Run",
        "",
        "From inside this folder (DATA_PATH and TOKENIZER_PATH as on the machine that ran; point them at your",
        "copies if yours live elsewhere):",
        "",
        "```bash",
        f"cd {folder_display}",
    ]
    for r in sub["seed_results"]:
        lines.append(" ".join(filter(None, [env_prefix(sub["env"]), f"SEED={r['seed']}",
                                            launcher(sub["world_size"])])))
    lines += ["```", ""]
    if sub["env"]:
        lines += ["Env overrides (every other setting is the script's default; the `setting:` lines of each log",
                  "list every resolved value):", "", "| name | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in sub["env"].items()]
    else:
        lines += ["No env overrides besides SEED: the script's defaults reproduce the run."]
    lines += [
        "",
        "## Compliance (read from the logs)",
        "",
        f"- [{tick(comp['train_time_le_600s'])}] training <= 600 s on every seed "
        f"(longest {comp['max_train_time_ms'] / 1000:.1f} s)",
        f"- [{tick(comp['eval_time_le_600s'])}] evaluation <= 600 s on every seed "
        f"(longest {comp['max_eval_time_ms'] / 1000:.1f} s)",
        f"- [{tick(comp['artifact_le_cap'])}] artifact <= {lp.CAP_BYTES:,} bytes "
        f"(largest {sub['bytes_total']:,}: code {sub['bytes_code']:,} + model)",
        f"- [{tick(n >= lp.RECORD_MIN_SEEDS)}] {n} seed{'s' if n > 1 else ''} of one config "
        f"(a record shows {lp.RECORD_MIN_SEEDS})",
        f"- TTT: {ttt_text(comp)}",
        f"- data: {'FineWeb val' if comp['fineweb_val'] else 'NOT FineWeb val'} "
        f"(`{sub['data']['val_pattern']}`, {sub['data']['val_tokens']:,} tokens)"
        f"{'; SMOKE=1 run, not a challenge score' if comp['smoke'] else ''}",
        f"- code: train_gpt.py, {sub['bytes_code']:,} bytes, sha256 `{sub['code_sha256']}`; every log records this hash",
        "",
        f"Hardware: {sub['hardware']} (world_size {sub['world_size']}); torch {sub['torch_version']}, "
        f"python {sub['python_version']}.",
        "",
        f"Review: `python3 records/verify.py {folder_display}` (add `--best-val-loss <previous record's val_loss>` "
        f"or `--previous-seeds <its submission.json>` to test against another record)",
        "",
        "## What changed",
        "",
        "TODO(author): the idea, what moved the score and by how much, ablations, credits.",
        "",
    ]
    return "\n".join(lines)


def ttt_text(comp: dict) -> str:
    """The compliance line on adaptation, from the paths the logs declared."""
    paths = ", ".join(f"`{n}`" for n in comp["adapting_eval_paths"])
    if comp["score_first_ttt"]:
        return f"score-first ({paths}): every token is scored before any update that uses it"
    if paths:
        return f"{paths} adapt on val tokens and NOT every one is declared score-first"
    return "none"


def freeze(args, records_dir: Path | None = None) -> Path:
    records_dir = records_dir or RECORDS_DIR
    logs = load_logs(args.logs)
    track = normalize_track(args.track)
    date = args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise FreezeError(f"--date {date!r} is not YYYY-MM-DD")
    out = Path(args.out) if args.out else records_dir / track / folder_name(date, args.name)
    if lp.under_records_track(out, records_dir):
        problem = lp.honest_record_problem(logs)
        if problem:
            raise FreezeError(f"refusing to write under records/track_*: {problem}; only real FineWeb val runs "
                              f"become records (freeze other runs with --out DIR outside records/)")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FreezeError(f"{out} exists and is not empty (--force overwrites)")
    submission = build_submission(logs, args, track, date)
    try:
        json.dumps(submission, allow_nan=args.allow_non_finite)
    except ValueError:
        bad = [f"{g.path} val_loss {g.submission['val_loss']} val_bpb {g.submission['val_bpb']}" for g in logs
               if not math.isfinite(g.submission["val_loss"] + g.submission["val_bpb"])]
        where = "; ".join(bad) or "a figure derived from the logs"
        raise FreezeError(f"submission.json would hold NaN or infinity ({where}): a diverged run is no result; "
                          "rerun it, or pass --allow-non-finite to freeze it as is")
    for g in logs:
        for check in lp.run_checks(g, time_limits=True):
            if not check.ok:
                print(f"warning: {check.name}: {check.detail}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpt.py").write_bytes(lp.counted_file(logs[0]))  # the counted file, from the log itself
    for g in logs:
        (out / seed_log_name(g)).write_bytes(g.path.read_bytes())
    if args.requirements:
        (out / "requirements.txt").write_bytes(Path(args.requirements).read_bytes())
    else:
        required, optional = extra_requirements(logs[0].source)
        if required or optional:
            text = [f"# beyond torch {submission['torch_version']}, numpy and sentencepiece (as in the logs)"]
            text += required + [f"# optional fast path: {o}" for o in optional]
            (out / "requirements.txt").write_text("\n".join(text) + "\n")
    if args.plot:
        plot.plot_curves(logs, out / plot.PLOT_NAME)
    (out / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
    try:
        display = str(out.resolve().relative_to(records_dir.resolve().parent))
    except ValueError:
        display = str(out.resolve())
    (out / "README.md").write_text(render_readme(submission, logs, display, args.plot))
    return out


# -----------------------------
# COMMAND LINE
# -----------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description="Freeze finished runs (their logs) into a record folder.")
    ap.add_argument("logs", nargs="+", help="train logs (logs/<RUN_ID>.txt), one per seed")
    ap.add_argument("--name", required=True, help="the record's name; the folder is YYYY-MM-DD_<Name>")
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", default="", help="one paragraph: what this record does")
    ap.add_argument("--track", default=lp.RECORD_TRACK, help=f"{' or '.join(lp.TRACKS)}")
    ap.add_argument("--date", help="YYYY-MM-DD (default: today, UTC)")
    ap.add_argument("--out", help="write the folder here instead of records/<track>/<date>_<Name>")
    ap.add_argument("--rule", action="append", choices=sorted(sig.RULES),
                    help="a significance rule to record (repeatable; default: every rule given its input)")
    ap.add_argument("--best-val-loss", type=float, help="the previous record's val_loss, for the readme rule")
    ap.add_argument("--previous-seeds", metavar="BPBS|FILE",
                    help="the previous record's per-seed val_bpb, for the welch rule: 1.0611,1.0608,1.0613, "
                         "a file of numbers, or its submission.json")
    ap.add_argument("--requirements", help="a requirements.txt to include as is")
    ap.add_argument("--plot", action="store_true", help=f"also draw {plot.PLOT_NAME}")
    ap.add_argument("--force", action="store_true", help="write into a non-empty folder")
    ap.add_argument("--allow-non-finite", action="store_true",
                    help="freeze runs whose scores are NaN or infinite (submission.json then holds NaN)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return lp.run_command("freeze", lambda: f"froze {len(args.logs)} run(s) into {freeze(args)}",
                          (FreezeError, OSError))


if __name__ == "__main__":
    sys.exit(main())
