"""Does a decode step run slower on another thread than the one that loaded the model?

    .venv/bin/python -m tinyserve_lab.ablations.step_thread [--enforce-eager] [--order main,thread,main,thread]
    .venv/bin/python -m tinyserve_lab.ablations.step_thread --built-in-thread

Each name in --order runs 40 batch-1 decode steps of the bundled model (defaults: bf16 + GGUF
blocks, compiled step) on the main thread or on a new thread, all on one engine built by the main
thread. --built-in-thread builds the engine and steps it on one new thread (the main thread runs no
torch op): the server's arrangement (AsyncEngine.build). Prints ms per step for each.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable
from typing import Any

from tinyserve import LLM
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve_lab.profile import decode_ms

STEPS = 40


def on_thread(fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` on a new thread and wait for it."""
    th = threading.Thread(target=fn, args=args)
    th.start()
    th.join()


def report(engine: LLMEngine, tag: str) -> None:
    """One JSON line: `tag` -> ms per batch-1 decode step at a 128-token context, on the calling thread."""
    print(json.dumps({tag: round(decode_ms(engine, 1, 128, STEPS), 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--order", default="main,thread,main,thread")
    p.add_argument("--built-in-thread", action="store_true")
    args = p.parse_args()
    if args.built_in_thread:
        on_thread(lambda: report(LLM(enforce_eager=args.enforce_eager).engine, "built_and_stepped_in_thread"))
        return
    engine = LLM(enforce_eager=args.enforce_eager).engine
    for i, where in enumerate(args.order.split(",")):
        tag = f"{where}-{i}"
        if where == "thread":
            on_thread(report, engine, tag)
        else:
            report(engine, tag)


if __name__ == "__main__":
    main()
