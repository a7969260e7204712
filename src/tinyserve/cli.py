"""`tinyserve {generate,serve,warmup} ...`, and the commands that installed packages add (the lab's `bench`,
`quantize`, `profile` and `report`, registered under the `tinyserve.commands` entry points).

A subcommand's module is imported only when that subcommand runs or shows its help, so `tinyserve
--help` imports neither torch nor the lab, and `tinyserve serve` imports nothing of the lab.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, and either its own flags and action (`module.add_args(parser)`, then
    `module.run(args)`, whose int result is the exit code) or subcommands of its own."""

    help: str
    module: str = ""
    add_args: str = "add_args"
    run: str = "run"
    subcommands: dict[str, Command] = field(default_factory=dict)


COMMANDS = {
    "generate": Command("generate text for one prompt, streamed to the terminal", "tinyserve.cli",
                        "add_generate_args", "cmd_generate"),
    "serve": Command("OpenAI-compatible HTTP server (SSE, continuous batching)", "tinyserve.server",
                     "add_serve_args", "run_server"),
    "warmup": Command("build everything a start needs for these engine flags (the GGUF's index, the native "
                      "kernels, the kernel choice, the compiled decode step) into the cache, then exit: run it "
                      "with serve's flags in an image build and every replica starts at full speed",
                      "tinyserve.cli", "add_warmup_args", "cmd_warmup"),
}


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from tinyserve.engine_args import add_engine_args

    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(p)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to the terminal, token by token."""
    from tinyserve.engine.llm_engine import LLMEngine
    from tinyserve.engine_args import engine_config
    from tinyserve.sampling import SamplingParams

    engine = LLMEngine(engine_config(args, compile=args.compile or "background"))  # answer at once
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.sampling_seed, stop=args.stop or None,
    )
    prompt: Any = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    seq = engine.add_request("cli", prompt, params)[0]
    shown = 0
    start = time.perf_counter()
    while not seq.finished:
        engine.step()
        text = seq.visible_text()
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    elapsed = time.perf_counter() - start
    n = len(seq.output_token_ids)
    print(f"\n[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s, finish_reason={seq.finish_reason}]",
          file=sys.stderr)
    return 0


def add_warmup_args(p: argparse.ArgumentParser) -> None:
    from tinyserve.engine_args import add_engine_args

    add_engine_args(p)


def cmd_warmup(args: argparse.Namespace) -> int:
    """Start an engine the way `serve` would, building what is missing, and say where it all is."""
    from tinyserve.engine.llm_engine import LLMEngine
    from tinyserve.engine_args import engine_config
    from tinyserve.system import cache_dir

    start = time.perf_counter()
    engine = LLMEngine(engine_config(args, compile="off" if args.compile == "off" else "blocking"))
    print(f"warm in {time.perf_counter() - start:.1f}s: {engine.model_name} ({engine.quantization}, "
          f"{engine.config.dtype}), compiled step {engine.compiled_step}, cache {cache_dir()}")
    return 0


def commands() -> dict[str, Command]:
    """Ours, then those that installed packages register (a `Command` per `tinyserve.commands` entry point)."""
    found = dict(COMMANDS)
    for ep in entry_points(group="tinyserve.commands"):
        found.setdefault(ep.name, ep.load())
    return found


def _add(sub: Any, name: str, cmd: Command, argv: list[str]) -> None:
    """The subparser of `cmd`; its flags (or its own subcommands' flags) only if `argv`, the command
    line's words without the options, chose it."""
    p = sub.add_parser(name, help=cmd.help, description=cmd.help)
    chosen = argv[:1] == [name]
    if cmd.subcommands:
        nested = p.add_subparsers(dest=f"{name}_command", required=True)
        rest = argv[1:] if chosen else []
        for sub_name, sub_cmd in cmd.subcommands.items():
            _add(nested, sub_name, sub_cmd, rest)
        return
    p.add_argument("--log-level", default="INFO")
    if chosen:
        try:
            module = importlib.import_module(cmd.module)
        except ModuleNotFoundError as e:  # the lab installed without its extras, say
            sys.exit(f"tinyserve {name}: {e}; the lab's commands need its dependencies: pip install 'tinyserve[lab]'")
        getattr(module, cmd.add_args)(p)
        run = getattr(module, cmd.run)
        p.set_defaults(func=lambda args: code if isinstance(code := run(args), int) else 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="tinyserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    words = [a for a in argv if not a.startswith("-")]  # the subcommand path comes before any flag's value
    for name, cmd in commands().items():
        _add(sub, name, cmd, words)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad flags or input: a clear message, not a traceback
        parser.exit(2, f"tinyserve: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
