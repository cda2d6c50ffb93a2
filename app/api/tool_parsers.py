"""Model output text -> content and tool calls, incrementally, one parser per tool-call format.

A format is a small class with feed(text) and finish(), both returning events in output order; the
streamed response turns each event into a chunk, the whole response joins them, so a call
reassembles the same way either way. The first format is Hermes' (NousResearch, also Qwen2.5's):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

which is also what shardserve teaches templates that know nothing of tools (app/api/tools.py)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ContentEvent:
    text: str


@dataclass(frozen=True)
class CallEvent:
    """One whole tool call: streamed as a delta with id and name, then its arguments."""

    index: int  # among this choice's calls
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


Event = ContentEvent | CallEvent


class ToolCallParser(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(body: str, index: int) -> CallEvent | None:
    """The call a tag's body holds, or None when it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return CallEvent(index, call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""  # text not yet emitted: a possible start of OPEN, or a call's body
        self._in_call = False
        self._calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buf.find(self.CLOSE)
                if end < 0:
                    return events
                body, self._buf = self._buf[:end], self._buf[end + len(self.CLOSE) :]
                self._in_call = False
                events.append(self._call_or_text(body, closed=True))
            else:
                start = self._buf.find(self.OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buf, self.OPEN)  # may be the start of a tag
                    head, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                    if head:
                        events.append(ContentEvent(head))
                    return events
                if start:
                    events.append(ContentEvent(self._buf[:start]))
                self._buf = self._buf[start + len(self.OPEN) :]
                self._in_call = True

    def finish(self) -> list[Event]:
        """The end of the output: an unclosed call still counts when its body is a whole call."""
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            return [self._call_or_text(rest, closed=False)]
        return [ContentEvent(rest)] if rest else []

    def _call_or_text(self, body: str, *, closed: bool) -> Event:
        call = _as_call(body, self._calls)
        if call is None:  # not a call after all: the client sees exactly what the model wrote
            return ContentEvent(self.OPEN + body + (self.CLOSE if closed else ""))
        self._calls += 1
        return call


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


PARSERS: dict[str, type[HermesParser]] = {"hermes": HermesParser}
