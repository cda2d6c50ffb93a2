"""What HTTP knows of the served model and how it gets it: the card and the loader.

The API sees an engine client and this card, nothing below them: the wiring (app/stack.py, which
the CLI builds) loads the model and hands both over through a Loader, so no module of app/api
imports the worker pool, the model code or torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.engine.engine import Engine
from app.engine.grammar import GrammarCompiler
from app.engine.types import Health, RequestOutput, TokenDecoder
from app.metrics import Metrics


class ServedTokenizer(TokenDecoder, Protocol):
    """What the API reads of the tokenizer (app/tokenizer/tokenizer.py implements it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def generation_defaults(self) -> Mapping[str, Any]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def template_knows_tools(self) -> bool: ...

    def config_info(self, max_model_len: int) -> dict[str, Any]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str: ...


@dataclass(frozen=True)
class ServedModel:
    """The served model as HTTP sees it; made by the wiring once the ranks are up."""

    name: str  # the model id responses report (the first --served-model-name)
    architecture: str
    dtype: str  # resolved: never "auto"
    tp: int
    max_model_len: int  # the context, prompt and output together
    vocab_size: int  # token ids must be below it: they must embed (model) and decode (tokenizer)
    tokenizer: ServedTokenizer
    grammars: GrammarCompiler  # checks output constraints before a request is queued
    compute: str  # the compute path the ranks run, as rank 0 reported it (/version)
    health: Callable[[], Health]  # the engine and its ranks, now (/health, /ready, every request)
    aliases: tuple[str, ...] = ()  # the other --served-model-name ids a request may name

    @property
    def names(self) -> tuple[str, ...]:
        """Every id a request may name, the reported one first (/v1/models lists them all)."""
        return (self.name, *self.aliases)


class Backend(Protocol):
    """A loaded, started serving stack as the API holds it."""

    @property
    def engine(self) -> Engine: ...

    @property
    def card(self) -> ServedModel: ...

    def shutdown(self) -> None: ...


# Loads and starts the stack (in a worker thread, off the event loop): every output of the engine
# goes to `deliver`, observed into `metrics` first. ValueError / OSError / ExecutorFailure: the
# model cannot be served, said in one line.
Loader = Callable[[Metrics, Callable[[list[RequestOutput]], None]], Backend]
