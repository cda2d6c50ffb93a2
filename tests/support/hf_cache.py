"""A Hugging Face hub cache laid out as huggingface_hub lays it out, for tests with no Hub.

models--ORG--NAME/refs/<branch> holds the commit hash; snapshots/<commit>/<file> are relative
symlinks into blobs/, named by the file's git blob id (sha1 of "blob <len>\\0" + data) or, for
LFS files (weights), by its sha256; trees/<commit>.json is the tree listing huggingface_hub caches
after a download, which makes it tell a complete snapshot from a partial one offline. The tests
check the result with huggingface_hub's own scan_cache_dir and read it through snapshot_download."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import repo_folder_name

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _blob_id(data: bytes, lfs: bool) -> str:
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_hub_cache(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    commit: str | None = None,
    ref: str = "main",
    absent: tuple[str, ...] = (),
) -> Path:
    """Put `files` (repo path -> bytes) in `cache` as the snapshot of `commit` on branch `ref`;
    the tree listing names all of them, but the files in `absent` are left out of the snapshot, as
    when only some of a repository's files were downloaded. Returns the snapshot directory."""
    commit = commit or hashlib.sha1(repr(sorted(files)).encode() + ref.encode()).hexdigest()
    repo = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    entries = {}
    for name, data in files.items():
        lfs = name.endswith(LFS_SUFFIXES)
        blob = _blob_id(data, lfs)
        entries[name] = TreeCacheEntry(
            size=len(data), blob_id=_blob_id(data, False), lfs_sha256=blob if lfs else None,
            lfs_size=len(data) if lfs else None,
        )  # fmt: skip
        if name in absent:
            continue
        (repo / "blobs" / blob).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    write_tree_cache(str(repo), commit, entries)
    return snap


def model_files(model_dir: Path) -> dict[str, bytes]:
    """A local model directory (tests/models.py writes them) as repo path -> bytes."""
    return {
        str(p.relative_to(model_dir)): p.read_bytes()
        for p in sorted(Path(model_dir).rglob("*"))
        if p.is_file()
    }
