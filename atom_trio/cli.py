"""``atom-trio``: ``serve`` an OpenAI-compatible server, or ``generate`` once from the command line.

Flags come from the option table (`atom_trio.options`): every field of
`EngineConfig` and `ServerSettings` is a flag in kebab-case and snake_case, with
ATOM's and vLLM's spellings (``-tp``, ``--kv_cache_dtype``, ``-O3``) and an
``ATOM_TRIO_<FIELD>`` environment variable as fallback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .options import add_arguments, load

log = logging.getLogger("atom_trio")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom-trio", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API (Ctrl-C or SIGTERM drains and exits)")
    add_arguments(serve)
    generate = commands.add_parser("generate", help="generate a completion for one prompt and print it")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--max-tokens", "--max_tokens", dest="gen_max_tokens", type=int, default=64)
    generate.add_argument("--temperature", dest="gen_temperature", type=float, default=0.0)
    add_arguments(generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (non-zero when the engine died or a flag was wrong)."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    try:
        config, settings = load(args, os.environ)
    except ValueError as exc:
        print(f"atom-trio: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if command == "serve":
            from .server import serve

            trio.run(serve, config, settings)
        else:
            trio.run(_generate, config, args)
    except BaseException as exc:  # noqa: BLE001 - anything that ends serving early is a failure to report
        if isinstance(exc, KeyboardInterrupt):
            return 130
        log.error("atom-trio %s failed: %r", command, exc, exc_info=settings.log_level == "debug")
        return 1
    return 0


async def _generate(config: object, args: dict) -> None:
    from .engine.engine import open_engine
    from .sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args["gen_max_tokens"], temperature=args["gen_temperature"])
    prompt = [{"role": "user", "content": args["prompt"]}] if args["chat"] else args["prompt"]
    async with open_engine(config) as engine:
        async for output in engine.generate(prompt, params):
            for completion in output.outputs:
                print(completion.text, end="", flush=True)
    print()
