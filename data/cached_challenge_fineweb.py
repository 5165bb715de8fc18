"""Download the challenge's tokenized FineWeb shards and tokenizer from a Hugging Face dataset repo.

Usage: python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10   (or: --variant sp1024 10)
       python3 data/cached_challenge_fineweb.py --variant sp8192            (kevclark/parameter-golf)
       python3 data/cached_challenge_fineweb.py --variant sp8192_caseops    (romeerp/parameter-golf-caseops-v1)
Each variant comes from the repo the records used (--repo-id or MATCHED_FINEWEB_REPO_ID overrides it).
Files land in data/datasets/fineweb10B_<variant>/ and data/tokenizers/; valid files already there are skipped.
Offline? Build a local dataset instead with data/build_shards.py (SMOKE=1 does so for train_gpt.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import logging as hf_logging

from build_shards import shard_problem  # one shard-format definition; a script's folder is on sys.path

# -----------------------------
# LAYOUT
# -----------------------------
# remote <prefix>/{datasets/..., tokenizers/..., docs_selected.jsonl} -> local ROOT/<same path>;
# remote <prefix>/manifest.json -> ROOT/manifests/<owner>/<name>/manifest.json (each repo lists its own datasets)

ROOT = Path(__file__).resolve().parent  # tests point this at a temporary folder
REMOTE_ROOT_PREFIX = "datasets"
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
CHALLENGE_VAL_DOCS = 50_000
# Per variant: the repo the records downloaded it from, and the tokenizer its manifest names (used only to say
# what an offline run would fetch). sp1024: the challenge's repo. sp8192: the 1.0810 record's README
# (MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf; its log: tokenizers/fineweb_8192_bpe.model). CaseOps: #1855
# and #1729's README and scripts (datasets/manifest.json, datasets/datasets/<dataset>/fineweb_val_bytes_*.bin).
KNOWN_VARIANTS = {
    "sp1024": ("willdepueoai/parameter-golf", "tokenizers/fineweb_1024_bpe.model"),
    "sp8192": ("kevclark/parameter-golf", "tokenizers/fineweb_8192_bpe.model"),
    "sp8192_lossless_caps_caseops_v1_reserved": (
        "romeerp/parameter-golf-caseops-v1", "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),
}
VARIANT_ALIASES = {"sp8192_caseops": "sp8192_lossless_caps_caseops_v1_reserved"}
SIDECAR_DATASETS = {"fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"}  # val byte sidecar, listed or not


class DownloadError(Exception):
    """A failure main() reports as one line and exit 1."""


def fetch(repo_id: str, rel: str, *, shard: bool = False, local: str | None = None) -> int:
    """Bring ROOT/rel (or ROOT/local) from the repo unless a valid copy is there; returns the bytes downloaded."""
    dest = ROOT / (local or rel)
    problem = None
    if dest.is_file():
        problem = shard_problem(dest) if shard else None
        if problem is None:
            print(f"skipped {local or rel} (present, {dest.stat().st_size} bytes)", flush=True)
            return 0
        print(f"re-downloading {local or rel}: the present copy is invalid ({problem})", flush=True)
    remote = f"{REMOTE_ROOT_PREFIX}/{rel}"
    try:
        # force: the bad local copy may be a hard link to the hub cache's blob, which is then bad too
        cached = hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", force_download=bool(problem))
        place(Path(cached), dest)
    except Exception as exc:  # the hub raises many types (HTTP, offline, OS); each becomes the one-line report
        raise DownloadError(failure_message(repo_id, remote, exc)) from None
    if shard and (problem := shard_problem(dest)):
        raise DownloadError(f"{repo_id}/{remote} downloaded but is not a valid shard ({problem}); rerun to retry")
    size = dest.stat().st_size
    print(f"downloaded {local or rel} ({size} bytes)", flush=True)
    return size


def place(cached: Path, dest: Path) -> None:
    source = cached.resolve(strict=True)  # hub cache entries are symlinks into its blob store
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)  # a hard link: no second copy of gigabytes of shards
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)  # never leaves a half-written file under the final name


def failure_message(repo_id: str, remote: str, exc: Exception) -> str:
    if isinstance(exc, LocalEntryNotFoundError):  # checked first: it is also an EntryNotFoundError
        cause = "the hub is unreachable and the file is not in the local cache"
    elif isinstance(exc, RepositoryNotFoundError):
        cause = "no such dataset repo (or it is private)"
    elif isinstance(exc, EntryNotFoundError):
        cause = "no such file in the repo"
    else:
        cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or ['no details'])[0]}"
    return f"cannot get {remote} from {repo_url(repo_id)}: {cause}"


def repo_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/datasets/{repo_id}"


ADVICE = ("Check the network, HF_ENDPOINT and --repo-id, or build local shards with data/build_shards.py "
          "(SMOKE=1 train_gpt.py builds a smoke set offline)")


# -----------------------------
# MANIFEST
# -----------------------------


def manifest_local(repo_id: str) -> str:
    return f"manifests/{repo_id}/manifest.json"


def load_manifest(repo_id: str, skip_manifest: bool) -> dict:
    path = ROOT / manifest_local(repo_id)
    if skip_manifest and not path.is_file():
        raise DownloadError(f"--skip-manifest: {path} is not there; run once without --skip-manifest")
    if not skip_manifest:
        fetch(repo_id, "manifest.json", local=manifest_local(repo_id))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{path} is unreadable or not JSON ({exc}); delete it and rerun") from None


def plan_files(manifest: dict, variant: str, train_shards: int) -> tuple[list[str], list[str]]:
    """(shard paths, other paths) to fetch, relative to ROOT, from the manifest's dataset and tokenizer entries."""
    name = f"fineweb10B_{variant}"
    datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
    if name not in datasets:
        raise DownloadError(f"dataset {name} is not in the manifest, which lists {', '.join(map(str, datasets))}")
    stats = datasets[name].get("stats") or {}
    files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > files_train:
        raise DownloadError(f"--train-shards {train_shards}: {name} has only {files_train} train shards")
    if stats.get("docs_val", CHALLENGE_VAL_DOCS) != CHALLENGE_VAL_DOCS:  # the export's stats, where it has them
        raise DownloadError(f"{name}'s manifest says its val split is {stats['docs_val']} documents, not the "
                            f"challenge's first {CHALLENGE_VAL_DOCS}: the rest would be in training (issue #2127); "
                            "use another repo")
    tokenizer_name = datasets[name].get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(f"tokenizer {tokenizer_name} of {name} is not in the manifest")
    tokenizer_files = [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if datasets[name].get("val_bytes_glob") or name in SIDECAR_DATASETS:  # per val token, the original text's bytes
        shards += [f"datasets/{name}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return shards, tokenizer_files


def expected_files(variant: str, train_shards: int) -> str:
    """What a download of a known variant fetches after its manifest (assuming one val shard), for the offline
    message; an unknown variant's files are only known from its manifest."""
    if variant not in KNOWN_VARIANTS:
        return f"fineweb10B_{variant}'s shards and tokenizer as that manifest lists them"
    stats = {"files_val": 1, "files_train": train_shards}
    presumed = {"datasets": [{"name": f"fineweb10B_{variant}", "tokenizer_name": "t", "stats": stats}],
                "tokenizers": [{"name": "t", "model_path": KNOWN_VARIANTS[variant][1]}]}
    shards, others = plan_files(presumed, variant, train_shards)
    train = [rel for rel in shards if "/fineweb_train_" in rel]
    listed = [rel for rel in shards if rel not in train]
    if train:
        listed.append(f"{train[0]}..{Path(train[-1]).name} ({len(train)} train shards)")
    return ", ".join(f"{REMOTE_ROOT_PREFIX}/{rel}" for rel in listed + others)


# -----------------------------
# COMMAND LINE
# -----------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download challenge FineWeb shards from Hugging Face")
    p.add_argument("train_shards_positional", nargs="?", type=int, help=argparse.SUPPRESS)
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (100M tokens each)")
    p.add_argument("--variant", default="sp1024",
                   help=f"tokenizer family: {', '.join([*KNOWN_VARIANTS, *VARIANT_ALIASES])} or another sp<N>")
    p.add_argument("--skip-manifest", action="store_true", help="use the local manifest.json, never download it")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its sidecar")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                   help="dataset repo (default: the variant's, see KNOWN_VARIANTS; else willdepueoai/parameter-golf)")
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    train_shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    if train_shards < 0:
        parser.error("train shards must be >= 0")
    variant = VARIANT_ALIASES.get(args.variant, args.variant)
    repo_id = args.repo_id or KNOWN_VARIANTS.get(variant, (DEFAULT_REPO_ID,))[0]
    hf_logging.set_verbosity_error()  # the hub's retry warnings would bury the one-line report
    try:
        try:
            manifest = load_manifest(repo_id, args.skip_manifest)
        except DownloadError as exc:
            plan = "" if args.skip_manifest else f"; it would then fetch {expected_files(variant, train_shards)}"
            raise DownloadError(f"{exc}{plan} into {ROOT}. {ADVICE}") from None
        shards, others = plan_files(manifest, variant, train_shards)
        if args.with_docs:
            others += ["docs_selected.jsonl", "docs_selected.source_manifest.json"]
        downloaded = sum(fetch(repo_id, rel, shard=True) for rel in shards)
        downloaded += sum(fetch(repo_id, rel) for rel in others)
    except DownloadError as exc:
        message = str(exc) if ADVICE in str(exc) else f"{exc}. {ADVICE}"
        print(f"cached_challenge_fineweb.py: error: {message}", file=sys.stderr)
        raise SystemExit(1)
    print(f"done shards:{len(shards)} other_files:{len(others)} downloaded_bytes:{downloaded} root:{ROOT}", flush=True)


if __name__ == "__main__":
    main()
