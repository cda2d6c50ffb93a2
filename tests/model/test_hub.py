"""Models by hub id, through huggingface_hub's real code path against a cache laid out as it lays
one out (tests/hf_cache.py): offline, with the Hub unreachable, by revision, and the errors."""

from __future__ import annotations

import json
import socket

import pytest
from huggingface_hub import constants, scan_cache_dir

from app.model.hub import HubModelError, HubOptions, is_hub_id
from app.model.store import ensure_model, resolve_model
from app.settings import Settings
from tests.support.hf_cache import lay_out_hub_cache, model_files
from tests.support.models import tiny_llama

REPO = "tiny-org/tiny-llama"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable(monkeypatch):
    """A Hub endpoint where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def _repo_files(model_dir) -> dict[str, bytes]:
    """The tiny model plus what real repositories carry beside it and the loader never reads."""
    return {
        **model_files(model_dir),
        "pytorch_model.bin": b"\0" * 64,
        "tiny.Q4_0.gguf": b"GGUF",
        "README.md": b"hi",
    }


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert is_hub_id("org/name.v1_2")
    for spec in ("name", "a/b/c", "/abs/dir", "./rel", "a/../b", "org--x/y", "", "org/"):
        assert not is_hub_id(spec), spec


def test_a_laid_out_cache_is_read_offline_fetching_only_what_the_loader_reads(
    tmp_path_factory, tmp_path, offline
):
    cache = tmp_path / "hub"
    files = _repo_files(tiny_llama(tmp_path_factory))
    # the tree listing names every file, the snapshot lacks those never downloaded: asking
    # huggingface_hub for any of them offline would raise IncompleteSnapshotError
    snap = lay_out_hub_cache(cache, REPO, files, absent=("pytorch_model.bin", "tiny.Q4_0.gguf", "README.md"))
    info = scan_cache_dir(cache)  # huggingface_hub's own reading of the layout
    assert [r.repo_id for r in info.repos] == [REPO] and not info.warnings
    (rev,) = next(iter(info.repos)).revisions
    assert rev.commit_hash == snap.name and rev.refs == frozenset({"main"})

    path = resolve_model(REPO, tmp_path, HubOptions(cache_dir=cache), download=True)
    assert path == snap
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert Settings(model=REPO).served_name == REPO


def test_a_sharded_model_needs_only_the_shards_its_index_names(tmp_path_factory, tmp_path, offline):
    files = model_files(tiny_llama(tmp_path_factory, shard=True))
    shards = set(json.loads(files["model.safetensors.index.json"])["weight_map"].values())
    assert len(shards) > 1
    files["consolidated.safetensors"] = b"\0" * 32  # another copy of the weights, as Mistral's repos have
    lay_out_hub_cache(tmp_path / "hub", REPO, files, absent=("consolidated.safetensors",))
    path = resolve_model(REPO, tmp_path, HubOptions(cache_dir=tmp_path / "hub"), download=True)
    assert {p.name for p in path.glob("*.safetensors")} == shards


def test_an_unreachable_hub_falls_back_to_the_cache(tmp_path_factory, tmp_path, unreachable):
    snap = lay_out_hub_cache(tmp_path / "hub", REPO, model_files(tiny_llama(tmp_path_factory)))
    assert ensure_model(REPO, tmp_path, hub=HubOptions(cache_dir=tmp_path / "hub")) == snap


def test_revision_picks_the_branch_or_commit(tmp_path_factory, tmp_path, offline):
    cache = tmp_path / "hub"
    files = model_files(tiny_llama(tmp_path_factory))
    main = lay_out_hub_cache(cache, REPO, files)
    v1 = lay_out_hub_cache(cache, REPO, {**files, "config.json": files["config.json"] + b"\n"}, ref="v1")
    assert main != v1
    assert resolve_model(REPO, tmp_path, HubOptions(revision="v1", cache_dir=cache), download=True) == v1
    assert (
        resolve_model(REPO, tmp_path, HubOptions(revision=main.name, cache_dir=cache), download=True) == main
    )
    with pytest.raises(HubModelError, match="revision v2"):
        resolve_model(REPO, tmp_path, HubOptions(revision="v2", cache_dir=cache), download=True)


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_an_id_neither_cached_nor_reachable_says_so(tmp_path, mode, request):
    request.getfixturevalue(mode)
    with pytest.raises(HubModelError) as e:
        ensure_model("nobody/nothing", tmp_path, hub=HubOptions(cache_dir=tmp_path / "hub"))
    msg = str(e.value)
    assert "'nobody/nothing'" in msg and str(tmp_path / "hub") in msg and "\n" not in msg
    assert ("HF_HUB_OFFLINE is set" in msg) if mode == "offline" else ("cannot be reached" in msg)


def test_a_partly_downloaded_snapshot_is_not_served(tmp_path_factory, tmp_path, offline):
    lay_out_hub_cache(
        tmp_path / "hub", REPO, model_files(tiny_llama(tmp_path_factory)), absent=("model.safetensors",)
    )
    with pytest.raises(HubModelError, match="not in the Hugging Face cache"):
        resolve_model(REPO, tmp_path, HubOptions(cache_dir=tmp_path / "hub"), download=True)


def test_a_repository_without_safetensors_is_refused(tmp_path_factory, tmp_path, offline):
    files = {k: v for k, v in _repo_files(tiny_llama(tmp_path_factory)).items() if k != "model.safetensors"}
    lay_out_hub_cache(tmp_path / "hub", REPO, files)
    with pytest.raises(HubModelError, match=r"no \*\.safetensors"):
        resolve_model(REPO, tmp_path, HubOptions(cache_dir=tmp_path / "hub"), download=True)


def test_download_subcommand_takes_a_hub_id(tmp_path_factory, tmp_path, capsys, offline):
    from app.cli import main

    snap = lay_out_hub_cache(tmp_path / "hub", REPO, model_files(tiny_llama(tmp_path_factory)))
    assert main(["download", REPO, "--download-dir", str(tmp_path / "hub")]) == 0
    assert capsys.readouterr().out.strip() == str(snap)
    assert main(["download", "nobody/nothing", "--download-dir", str(tmp_path / "hub")]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
