"""``atom-trio``: ``serve`` an OpenAI-compatible server, or ``generate`` once from the command line.

Flags come from the option table (`atom_trio.options`): every field of
`EngineConfig` and `ServerSettings` is a flag in kebab-case and snake_case,
with ATOM's and vLLM's spellings (``-tp``, ``--kv_cache_dtype``, ``-O3``) and
an ``ATOM_TRIO_<FIELD>`` environment variable as fallback; ``generate`` takes
the engine's and none of the server's.

Everything that can be checked is checked before anything loads: the
options (`atom_trio.options.load`), the device (`check_device`), where
``serve`` will listen, ``generate``'s sampling parameters. A failed check
prints one line and exits with status 2; a failure after that exits with 1.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from . import __version__
from .config import ServerSettings
from .errors import InvalidConfig, InvalidRequest
from .executor import check_device
from .options import add_arguments, load
from .sampling_params import SamplingParams

log = logging.getLogger("atom_trio")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom-trio", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API (Ctrl-C or SIGTERM drains and exits)")
    add_arguments(serve, "serve")
    generate = commands.add_parser(
        "generate", help="generate a completion for one prompt and print it (engine options only)"
    )
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--max-tokens", "--max_tokens", dest="gen_max_tokens", type=int, default=64,
                          help="most tokens to generate [default: 64]")
    generate.add_argument("--temperature", dest="gen_temperature", type=float, default=0.0,
                          help="sampling temperature; 0 is greedy [default: 0.0]")
    add_arguments(generate, "generate")
    return parser


def run() -> NoReturn:
    """The ``atom-trio`` command (and ``python -m atom_trio``): `main`, then exit.

    By then the engine, its workers and the listener are closed. The garbage
    collector's last pass over every object of torch and transformers would
    add a second or more (on a busy box) between a dead engine and the exit its
    supervisor waits for, and free nothing the exit does not: it is skipped.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (2: a wrong option, 1: the engine died or failed to start)."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        config, settings = load(args, os.environ, command)
        if command == "serve":
            _check_listen(settings)
        else:
            params = SamplingParams(max_tokens=args["gen_max_tokens"], temperature=args["gen_temperature"])
            params.validate()
        check_device(config)
    except (InvalidConfig, InvalidRequest) as exc:  # InvalidRequest: generate's own sampling flags
        print(f"atom-trio {command}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(settings.log_level.upper())  # over the library default (atom_trio._logging)
    try:
        if command == "serve":
            from .server import serve

            trio.run(serve, config, settings)
        else:
            trio.run(_generate, config, args, params)
    except BaseException as exc:  # noqa: BLE001 - anything that ends serving early is a failure to report
        if isinstance(exc, KeyboardInterrupt):
            return 130
        log.error("atom-trio %s failed: %r", command, exc, exc_info=settings.log_level == "debug")
        return 1
    return 0


def _check_listen(settings: ServerSettings) -> None:
    """Refuse an address hypercorn could not bind now, rather than after the model has loaded.

    Binds as hypercorn will (``SO_REUSEADDR``, the family its bind string
    implies) and lets go at once.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.port))
        except OSError as exc:
            raise InvalidConfig(
                f"cannot listen on host {settings.host!r} port {settings.port}: {exc.strerror or exc}",
                options=("host", "port"),
            ) from None


async def _generate(config: object, args: dict, params: SamplingParams) -> None:
    from .engine.engine import open_engine

    prompt = [{"role": "user", "content": args["prompt"]}] if args["chat"] else args["prompt"]
    async with open_engine(config) as engine:
        async for output in engine.generate(prompt, params):
            for completion in output.outputs:
                print(completion.text, end="", flush=True)
    print()
