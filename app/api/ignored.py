"""Unknown request fields: accepted, as OpenAI clients send fields a server may not know, but never
silently: each name is logged once per server at warning level (vLLM's wording), and every response
to a request that had some lists them in a header, so a typo (`max_token`) shows where it was made.

Names come from clients, so they are escaped (ASCII, no control characters) and bounded before they
reach a log line or a header, and the set of names already logged is bounded too."""

from __future__ import annotations

import json
import logging
import threading

from pydantic import BaseModel

HEADER = "x-shardserve-ignored-fields"
MAX_NAME_CHARS = 64
MAX_HEADER_NAMES = 32
MAX_REMEMBERED = 1024  # past this many distinct names, new ones are no longer logged

log = logging.getLogger("shardserve.api")


def _shown(name: str) -> str:
    text = json.dumps(name)[1:-1]  # ASCII, control characters escaped: safe in a header and a log
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 3] + "..."


class IgnoredFields:
    """Owned by ServerState; routes call note() from the event loop and from tokenizing threads."""

    def __init__(self) -> None:
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def note(self, body: BaseModel) -> str | None:
        """The header value naming body's unknown top-level fields (None if it has none); logs
        the names not logged before."""
        names = sorted(_shown(k) for k in body.model_extra or {})
        if not names:
            return None
        with self._lock:
            room = MAX_REMEMBERED - len(self._logged)
            new = [n for n in names if n not in self._logged][: max(room, 0)]
            self._logged.update(new)
        if new:
            log.warning("The following fields were present in the request but ignored: %s", ", ".join(new))
        shown = names[:MAX_HEADER_NAMES] + (["..."] if len(names) > MAX_HEADER_NAMES else [])
        return ", ".join(shown)
