"""Models by Hugging Face hub id (`--model org/name`), through huggingface_hub and its cache.

huggingface_hub is the client on purpose, as pip is for the built-in models: it owns the standard
cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`, shared with transformers and vLLM), the
token (`HF_TOKEN` or `huggingface-cli login`), offline mode (`HF_HUB_OFFLINE=1`) and the fallback
to the cached snapshot when the Hub cannot be reached. Only what the loader reads is fetched, in
two passes: the small files first (config, tokenizer, generation config, the shard index), then
exactly the safetensors files the index names (every `*.safetensors` when there is no index, which
is what app/model/checkpoint.py then reads). A repository of several weight formats (PyTorch
`.bin`, GGUF, ONNX, a consolidated copy) thus costs only the safetensors shards it serves from.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from app.model.errors import ModelLoadError
from app.settings import Settings

# what app/model/config.py and app/tokenizer.py read from a model directory
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    "model.safetensors.index.json",
)
# huggingface_hub's own rule for repo ids (validate_repo_id), with the namespace required: a bare
# name would be ambiguous with our built-in names and with typos of local paths
_REPO_ID = re.compile(r"\b[\w\-.]+\b/\b[\w\-.]{1,96}\b")


class HubModelError(ModelLoadError):
    """The repository is neither in the cache nor reachable, or holds no loadable model."""


@dataclass(frozen=True)
class HubOptions:
    """Where and what to fetch; the defaults are huggingface_hub's (its environment variables)."""

    revision: str | None = None  # branch, tag or commit; None: main
    token: str | None = None  # None: HF_TOKEN or the saved login, as huggingface_hub decides
    cache_dir: Path | None = None  # None: HF_HUB_CACHE (vLLM's --download-dir sets it)
    progress: bool = True  # download bars (huggingface_hub's); off when stderr is not a terminal

    @classmethod
    def of(cls, settings: Settings, progress: bool = True) -> HubOptions:
        return cls(settings.revision, settings.hf_token, settings.download_dir, progress)


def is_hub_id(spec: str) -> bool:
    """`org/name` that is not a path on disk (checked by the caller first)."""
    return bool(_REPO_ID.fullmatch(spec)) and ".." not in spec and "--" not in spec


def snapshot(repo_id: str, options: HubOptions, *, download: bool = True) -> Path:
    """The snapshot directory of `repo_id` at `options.revision`, holding the files the loader reads.

    With `download` false (or HF_HUB_OFFLINE set) only the cache is looked at; otherwise missing
    files are downloaded, and an unreachable Hub falls back to a complete cached snapshot."""
    meta = _fetch(repo_id, options, METADATA_FILES, download)
    if not (meta / "config.json").is_file():
        raise HubModelError(
            f"{repo_id}: the repository has no config.json; only Hugging Face safetensors models load "
            "by id (for a GGUF file, download it and pass its path)"
        )
    index = meta / "model.safetensors.index.json"
    weights = ["*.safetensors"]
    if index.is_file():
        try:
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise HubModelError(f"{index}: malformed index ({e})") from None
    path = _fetch(repo_id, options, weights, download)
    if not any(path.glob("*.safetensors")):
        raise HubModelError(
            f"{repo_id}: the repository has no *.safetensors weights (PyTorch .bin checkpoints are not "
            "loaded: they run code when unpickled)"
        )
    return path


def _fetch(repo_id: str, options: HubOptions, patterns: list[str] | tuple[str, ...], download: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars

    quiet = disable_progress_bars() if not options.progress else contextlib.nullcontext()
    revision = options.revision or "main"
    try:
        with quiet:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=options.cache_dir,
                    token=options.token,
                    allow_patterns=list(patterns),
                    local_files_only=not download,
                )
            )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        # a private or gated repository answers "not found" without a token that may read it
        raise HubModelError(
            f"{repo_id}: no such model on the Hugging Face Hub, or it is private or gated and needs "
            f"HF_TOKEN (or --hf-token) with access to it ({_first_line(e)})"
        ) from None
    except RevisionNotFoundError:
        raise HubModelError(f"{repo_id}: the Hub has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        # LocalEntryNotFoundError: not cached and offline, or the Hub unreachable; the snapshot's
        # incompleteness (IncompleteSnapshotError) and network errors come through the others
        cache = options.cache_dir or constants.HF_HUB_CACHE
        if not download:
            why = "not looked up on the Hub (resolving only)"
        elif constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        else:
            why = f"the Hub cannot be reached ({_first_line(e.__cause__ or e)})"
        raise HubModelError(
            f"model {repo_id!r} (revision {revision}) is not in the Hugging Face cache {cache} and {why}. "
            f"Download it where the Hub is reachable (`hf download {repo_id}`) into that cache, or set "
            "HF_HUB_CACHE to a cache holding it"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
