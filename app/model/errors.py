"""The one error type for a model that cannot be loaded: shown to users as a single line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from os import PathLike


class ModelLoadError(ValueError):
    """A model file or directory is missing, malformed or unsupported; the message names it."""


@contextlib.contextmanager
def reading_model(path: str | PathLike[str], *named: type[Exception]) -> Iterator[None]:
    """Whatever goes wrong while reading a model from `path` leaves as one ModelLoadError naming the
    file: corrupt bytes surface deep inside numpy, the tokenizers library or a config conversion,
    as errors that name neither the file nor the problem. ModelLoadError and the `named` types
    already say both and pass unchanged; the original error stays chained (--debug shows it)."""
    try:
        yield
    except (ModelLoadError, *named):
        raise
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelLoadError(
            f"{path}: cannot be read as a model, the file may be corrupt ({type(e).__name__}: {detail})"
        ) from e
