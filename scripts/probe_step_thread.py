"""Does a decode step run slower on another thread than the one that loaded the model?

    .venv/bin/python scripts/probe_step_thread.py [--enforce-eager] [--order main,thread,main,thread]
    .venv/bin/python scripts/probe_step_thread.py --built-in-thread

Each name in --order runs 40 batch-1 decode steps of the bundled model (defaults: bf16 + GGUF
blocks, compiled step) on the main thread or on a new thread, all on one engine built by the main
thread. --built-in-thread builds the engine and steps it on one new thread (the main thread runs no
torch op): the server's arrangement (AsyncEngine.build). Prints ms per step for each.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from tinyserve import LLM, SamplingParams
from tinyserve.engine.llm_engine import LLMEngine


def ms_per_step(engine: LLMEngine, tag: str, steps: int = 40) -> float:
    engine.add_request(tag, [100 + j for j in range(128)], SamplingParams(temperature=0, max_tokens=steps + 8,
                                                                          ignore_eos=True))
    while not engine.scheduler.running or engine.scheduler.running[0].num_computed < 128:
        engine.step()
    for _ in range(3):
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    engine.pop_output(tag)
    return round(ms, 2)


def on_thread(fn, *args) -> None:
    th = threading.Thread(target=fn, args=args)
    th.start()
    th.join()


def report(engine: LLMEngine, tag: str) -> None:
    print(json.dumps({tag: ms_per_step(engine, tag)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--order", default="main,thread,main,thread")
    p.add_argument("--built-in-thread", action="store_true")
    args = p.parse_args()
    if args.built_in_thread:
        on_thread(lambda: report(LLM(enforce_eager=args.enforce_eager).engine, "built_and_stepped_in_thread"))
        return
    engine = LLM(enforce_eager=args.enforce_eager).engine
    for i, where in enumerate(args.order.split(",")):
        if where == "thread":
            on_thread(report, engine, f"{where}-{i}")
        else:
            report(engine, f"{where}-{i}")


if __name__ == "__main__":
    main()
