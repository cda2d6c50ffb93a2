"""`shardserve` (and `python -m app`): download, generate, serve, inspect, bench.

Options come from the Settings fields, so every flag has its SHARDSERVE_<NAME> twin and one
description; flags given on the command line override the environment. vLLM's command line
(positional model, its spellings, --config) is app/cli/vllm_flags.py; its flags we ignore or refuse
are app/cli/foreign_flags.py."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from app.bench import TARGETS
from app.cli.foreign_flags import add_foreign_flags, check_foreign_flags
from app.cli.vllm_flags import (
    CONFIG_MODEL,
    FLAG_ALIASES,
    GROUP_HELP,
    HELP_GROUPS,
    expand_config,
    vllm_spellings,
)
from app.engine.types import ExecutorFailure
from app.model.registry import describe_families  # torch-free: classes are imported on first use
from app.settings import DTYPE_ALIASES, Settings

# Settings fields each subcommand takes (serve takes all of them).
_HUB_FIELDS = ("revision", "hf_token", "download_dir")
_MODEL_FIELDS = (*_HUB_FIELDS, "home", "model", "dtype", "tp", "device", "kernels", "max_model_len", "chat_template", "seed",
                 "kv_cache_tokens", "kv_cache_memory_bytes", "block_size", "max_num_seqs", "max_num_batched_tokens",
                 "log_level")  # fmt: skip


def _add_settings_options(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per Settings field (all of them, or `names`), in vLLM's help groups."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title, fields in HELP_GROUPS.items():
        for name in fields:
            if names is not None and name not in names:
                continue
            if title not in groups:
                groups[title] = parser.add_argument_group(title, GROUP_HELP[title])
            _add_option(groups[title], name)


def _add_option(group: argparse._ArgumentGroup, name: str) -> None:
    field = Settings.model_fields[name]
    flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, ())]
    # the families are named here, not in Settings: app/settings.py imports no model code, so the
    # API that reads Settings stays torch-free
    families = f"; families: {describe_families()}" if name == "model" else ""
    help_text = f"{field.description or name}{families} [env SHARDSERVE_{name.upper()}]"
    ann = field.annotation
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is bool:
        group.add_argument(
            *flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
    elif origin is list or (args and typing.get_origin(args[0]) is list):
        # as vLLM's nargs="+" (`--api-key K1 K2`), and repeatable as before (`--api-key K1 --api-key K2`)
        group.add_argument(
            *flags,
            action="extend",
            nargs="+",
            default=argparse.SUPPRESS,
            help=help_text + " (one or more; repeatable)",
        )
    elif origin is typing.Literal:
        choices = (*args, *(DTYPE_ALIASES if name == "dtype" else ()))
        group.add_argument(*flags, choices=choices, default=argparse.SUPPRESS, help=help_text)
    else:
        group.add_argument(*flags, default=argparse.SUPPRESS, help=help_text)


def _settings(ns: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    positional = getattr(ns, "model_tag", None)
    if positional is not None:  # `serve MODEL`, as vLLM's
        if overrides.get("model", positional) != positional:
            raise ValueError(f"two models given: {positional} (positional) and --model {overrides['model']}")
        overrides["model"] = positional
    elif getattr(ns, "config_model", None) is not None:  # the command line wins over --config's file
        overrides.setdefault("model", ns.config_model)
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="OpenAI-compatible LLM server")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "download",
        help="fetch a built-in model ($SHARDSERVE_HOME) or a hub id (Hugging Face cache) ahead of serving",
    )
    p.add_argument(
        "name",
        nargs="?",
        default=None,
        help="built-in model name or hub id org/name (default: the default model)",
    )
    p.add_argument("--verify", action="store_true", help="re-check the sha256 of a cached built-in file")
    _add_settings_options(p, ("home", *_HUB_FIELDS))

    p = sub.add_parser("generate", help="generate text from a prompt, printing tokens as they come")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    _add_settings_options(p, _MODEL_FIELDS)

    p = sub.add_parser("rank", help="run tensor-parallel ranks that join a leader on another machine")
    p.add_argument(
        "--rank-offset", type=int, required=True, help="first rank run here (rank 0 is the leader's)"
    )
    _add_settings_options(
        p, ("dist_init", "tp", "local_ranks", "device", "log_level", "model", "home", *_HUB_FIELDS)
    )

    p = sub.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API", usage="shardserve serve [MODEL] [options]"
    )
    p.add_argument(
        "model_tag", nargs="?", metavar="MODEL", help="the model, as vLLM takes it (same as --model)"
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="flags from a YAML file (keys are flag names; the command line wins)",
    )
    p.add_argument(CONFIG_MODEL, help=argparse.SUPPRESS)
    _add_settings_options(p)
    add_foreign_flags(p)

    p = sub.add_parser("inspect", help="what a model costs in memory, from its metadata alone")
    p.add_argument(
        "--tp",
        "--tp-sizes",
        dest="tp_sizes",
        metavar="N",
        type=int,
        nargs="+",
        default=None,
        help="tensor-parallel sizes to cost (default: 1, 2 and --tp of the environment)",
    )
    p.add_argument(
        "--dtype",
        "--dtypes",
        dest="dtypes",
        metavar="D",
        nargs="+",
        default=None,
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        help="weight dtypes to cost (default: fp32 bf16 int8 and what auto means here)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_settings_options(
        p, ("home", "model", "device", "kernels", "max_model_len", "max_num_seqs", "block_size", *_HUB_FIELDS)
    )

    p = sub.add_parser(
        "bench", help="benchmarks: serve, engine, kernels, structured; report (make bench), peers"
    )
    p.add_argument("target", choices=TARGETS)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings, list[str]]:
    """The parsed command line (a --config file expanded), its Settings, and the warning lines of
    the vLLM flags it ignores; ValueError (or ValidationError) for what it refuses."""
    bools = {"--" + k.replace("_", "-") for k, f in Settings.model_fields.items() if f.annotation is bool}
    ns = build_parser().parse_args(vllm_spellings(expand_config(argv, bools)))
    settings = _settings(ns)
    return ns, settings, check_foreign_flags(ns, settings.model, settings.revision)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns, settings, warnings = parse_args(sys.argv[1:] if argv is None else argv)
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = "--" + str(err["loc"][0]).replace("_", "-") + ": " if err["loc"] else ""
        print(f"shardserve: error: {where}{msg}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"shardserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for line in warnings:
        logging.getLogger("shardserve").warning(line)
    try:
        if ns.command == "download":
            from app.model.hub import HubOptions, is_hub_id, snapshot
            from app.model.store import download_model

            name = ns.name or settings.model
            if is_hub_id(name.strip()):
                print(snapshot(name.strip(), HubOptions.of(settings, sys.stderr.isatty())))
                return 0
            print(download_model(name, settings.home, verify=ns.verify))
            return 0
        if ns.command == "generate":
            from app.cli.generate import generate

            return generate(settings, ns)
        if ns.command == "rank":
            from app.model.hub import HubOptions
            from app.model.store import ensure_model
            from app.worker.remote import run_remote_ranks

            if settings.dist_init is None:
                raise ValueError("--dist-init is required: the leader's rendezvous address tcp://HOST:PORT")
            n = settings.local_ranks or settings.tp - ns.rank_offset
            # this machine's copy of the model (a built-in name resolves in its own cache)
            model = (
                ensure_model(settings.model, settings.home, hub=HubOptions.of(settings))
                if "model" in vars(ns)
                else None
            )
            return run_remote_ranks(
                settings.dist_init, settings.tp, ns.rank_offset, n, settings.device, model
            )
        if ns.command == "serve":
            from app.api.listen import listen_on, raise_open_file_limit

            # before the seconds of importing torch and loading: a busy port fails at once
            nofile = raise_open_file_limit()
            sock = listen_on(settings.host, settings.port, settings.uds)
            from app.api.server import serve
            from app.model.errors import ModelLoadError
            from app.stack import check_before_load, loader

            try:  # what can be refused before the model loads is refused here, with nothing spawned
                check_before_load(settings)
            except ModelLoadError as e:
                raise ModelLoadError(f"the model failed to load: {e}") from e
            return serve(settings, loader(settings), sock, nofile=nofile, debug=ns.debug)
        if ns.command == "inspect":
            from app.cli.inspect_model import inspect_command

            return inspect_command(settings, ns)
        if ns.command == "bench":
            from app.bench import bench_command

            return bench_command(ns.target, ns.rest)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ExecutorFailure) as e:  # ModelLoadError, TokenizerError: ValueErrors
        if ns.debug:
            raise
        print(f"shardserve: error: {e}", file=sys.stderr)
        return 1
    return 0
