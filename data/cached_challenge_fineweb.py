"""Download the challenge's tokenized FineWeb shards and tokenizer from its Hugging Face dataset repo.

Usage: python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10   (or: --variant sp1024 10)
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

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import logging as hf_logging

from build_shards import shard_problem  # one shard-format definition; a script's folder is on sys.path

# -----------------------------
# LAYOUT
# -----------------------------
# remote <prefix>/{manifest.json, datasets/..., tokenizers/..., docs_selected.jsonl} -> local ROOT/<same path>

ROOT = Path(__file__).resolve().parent  # tests point this at a temporary folder
REMOTE_ROOT_PREFIX = "datasets"
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"


class DownloadError(Exception):
    """A failure main() reports as one line and exit 1."""


def fetch(repo_id: str, rel: str, *, shard: bool = False) -> int:
    """Bring ROOT/rel from the repo unless a valid copy is there; returns the bytes downloaded."""
    dest = ROOT / rel
    problem = None
    if dest.is_file():
        problem = shard_problem(dest) if shard else None
        if problem is None:
            print(f"skipped {rel} (present, {dest.stat().st_size} bytes)", flush=True)
            return 0
        print(f"re-downloading {rel}: the present copy is invalid ({problem})", flush=True)
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
    print(f"downloaded {rel} ({size} bytes)", flush=True)
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
    return (
        f"cannot get {remote} from dataset repo {repo_id}: {cause}. Check the network, HF_ENDPOINT and --repo-id, "
        "or build local shards with data/build_shards.py (SMOKE=1 train_gpt.py builds a smoke set offline)"
    )


# -----------------------------
# MANIFEST
# -----------------------------


def load_manifest(repo_id: str, skip_manifest: bool) -> dict:
    path = ROOT / "manifest.json"
    if skip_manifest and not path.is_file():
        raise DownloadError(f"--skip-manifest: {path} is not there; run once without --skip-manifest")
    if not skip_manifest:
        fetch(repo_id, "manifest.json")
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
    tokenizer_name = datasets[name].get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(f"tokenizer {tokenizer_name} of {name} is not in the manifest")
    tokenizer_files = [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return shards, tokenizer_files


# -----------------------------
# COMMAND LINE
# -----------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download challenge FineWeb shards from Hugging Face")
    p.add_argument("train_shards_positional", nargs="?", type=int, help=argparse.SUPPRESS)
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (100M tokens each)")
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024")
    p.add_argument("--skip-manifest", action="store_true", help="use the local manifest.json, never download it")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its sidecar")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID))
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    train_shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    if train_shards < 0:
        parser.error("train shards must be >= 0")
    hf_logging.set_verbosity_error()  # the hub's retry warnings would bury the one-line report
    try:
        manifest = load_manifest(args.repo_id, args.skip_manifest)
        shards, others = plan_files(manifest, args.variant, train_shards)
        if args.with_docs:
            others += ["docs_selected.jsonl", "docs_selected.source_manifest.json"]
        downloaded = sum(fetch(args.repo_id, rel, shard=True) for rel in shards)
        downloaded += sum(fetch(args.repo_id, rel) for rel in others)
    except DownloadError as exc:
        print(f"cached_challenge_fineweb.py: error: {exc}", file=sys.stderr)
        raise SystemExit(1)
    print(f"done shards:{len(shards)} other_files:{len(others)} downloaded_bytes:{downloaded} root:{ROOT}", flush=True)


if __name__ == "__main__":
    main()
