"""Structured outputs measured: do constrained outputs hold, and what does the constraint cost?

1. `validity`: 50 held-out schema prompts (nested objects, enums, arrays, required fields; built below from
   ten domains x five shapes, each with its own subject), generated greedily with the constraint off and
   on. An output counts if it parses and validates (`jsonschema`): strictly (the whole text is the JSON)
   or, with the constraint off, leniently too (the first {...} in the text, code fences and prose around it
   ignored).
2. `throughput`: requests at concurrency c (max_num_seqs=c) with and without a JSON-schema constraint on
   every one, same prompts and max_tokens (an open-ended schema, so constrained outputs run as long as
   free ones), interleaved off/on over repeats; output tok/s and the grammar's mask time per step.

    .venv/bin/tinyserve bench structured validity --model qwen2.5-coder-0.5b
    .venv/bin/tinyserve bench structured throughput --concurrency 1 16
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema
from tqdm import tqdm

from tinyserve import LLM, SamplingParams
from tinyserve.sampling import StructuredOutputsParams
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf
from tinyserve_lab.profile import StepTimer

STR, INT, NUM = {"type": "string", "maxLength": 60}, {"type": "integer"}, {"type": "number"}


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


def _arr(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "maxItems": 5}


# Per domain: six fields from plain to nested (shape k uses the first k + 2), and five subjects.
DOMAINS: dict[str, tuple[list[tuple[str, dict[str, Any]]], list[str]]] = {
    "person": ([("name", STR), ("age", INT), ("role", _enum("engineer", "teacher", "nurse", "artist")),
                ("skills", _arr(STR)), ("address", _obj({"street": STR, "city": STR, "zip": STR})),
                ("jobs", _arr(_obj({"company": STR, "years": INT})))],
               ["a nurse in Lyon", "a retired pilot", "a young painter", "a school teacher in Kyoto", "a chef"]),
    "product": ([("title", STR), ("price", NUM), ("currency", _enum("USD", "EUR", "GBP")), ("tags", _arr(STR)),
                 ("dimensions", _obj({"width": NUM, "height": NUM, "depth": NUM})),
                 ("reviews", _arr(_obj({"stars": INT, "text": STR})))],
                ["a coffee grinder", "hiking boots", "a desk lamp", "a phone case", "a tent"]),
    "event": ([("name", STR), ("attendees", INT), ("kind", _enum("concert", "conference", "wedding", "match")),
               ("speakers", _arr(STR)), ("venue", _obj({"name": STR, "city": STR, "capacity": INT})),
               ("sessions", _arr(_obj({"title": STR, "minutes": INT})))],
              ["a jazz night", "a Python conference", "a football final", "a village wedding", "a book fair"]),
    "recipe": ([("dish", STR), ("servings", INT), ("difficulty", _enum("easy", "medium", "hard")),
                ("steps", _arr(STR)), ("nutrition", _obj({"calories": INT, "protein_g": NUM})),
                ("ingredients", _arr(_obj({"item": STR, "grams": INT})))],
               ["pancakes", "a lentil soup", "sushi rolls", "a lemon tart", "guacamole"]),
    "book": ([("title", STR), ("year", INT), ("genre", _enum("fiction", "history", "science", "poetry")),
              ("themes", _arr(STR)), ("author", _obj({"name": STR, "born": INT})),
              ("chapters", _arr(_obj({"number": INT, "title": STR})))],
             ["a novel about the sea", "a history of Rome", "a physics primer", "a poetry collection",
              "a detective story"]),
    "flight": ([("number", STR), ("seats", INT), ("status", _enum("scheduled", "delayed", "cancelled", "landed")),
                ("crew", _arr(STR)), ("route", _obj({"from": STR, "to": STR, "km": INT})),
                ("legs", _arr(_obj({"airport": STR, "minutes": INT})))],
               ["a flight from Paris to Oslo", "a night flight to Tokyo", "a short hop to Lyon",
                "a delayed flight to Madrid", "a cargo flight"]),
    "order": ([("id", STR), ("total", NUM), ("payment", _enum("card", "cash", "transfer")),
               ("notes", _arr(STR)), ("customer", _obj({"name": STR, "email": STR})),
               ("lines", _arr(_obj({"sku": STR, "qty": INT, "price": NUM})))],
              ["an order of three books", "a grocery order", "an office chair order", "a flower delivery",
               "a bike repair order"]),
    "weather": ([("city", STR), ("temp_c", NUM), ("sky", _enum("clear", "cloudy", "rain", "snow")),
                 ("alerts", _arr(STR)), ("wind", _obj({"speed_kmh": NUM, "direction": STR})),
                 ("hours", _arr(_obj({"hour": INT, "temp_c": NUM})))],
                ["a winter day in Oslo", "a storm in Miami", "spring in Rome", "a foggy morning in London",
                 "summer in Cairo"]),
    "movie": ([("title", STR), ("minutes", INT), ("rating", _enum("G", "PG", "PG-13", "R")),
               ("cast", _arr(STR)), ("director", _obj({"name": STR, "country": STR})),
               ("awards", _arr(_obj({"name": STR, "year": INT})))],
              ["a space adventure", "a romantic comedy", "a war documentary", "an animated film", "a thriller"]),
    "company": ([("name", STR), ("employees", INT), ("sector", _enum("tech", "retail", "energy", "health")),
                 ("offices", _arr(STR)), ("ceo", _obj({"name": STR, "since": INT})),
                 ("products", _arr(_obj({"name": STR, "launched": INT})))],
                ["a solar panel maker", "a bakery chain", "a hospital group", "a game studio", "a bike shop"]),
}


def schema_prompts() -> list[tuple[str, dict[str, Any]]]:
    """The 50 (prompt, schema) pairs: domain x shape; odd shapes leave their last field optional."""
    out = []
    for domain, (fields, subjects) in DOMAINS.items():
        for shape, subject in enumerate(subjects):
            props = dict(fields[: shape + 2])
            required = list(props)[:-1] if shape % 2 else list(props)
            schema = _obj(props, required) | {"additionalProperties": False}
            prompt = (f"Describe {subject} as a JSON object ({domain}). Reply with the JSON only; it must follow "
                      f"this JSON schema:\n{json.dumps(schema)}")
            out.append((prompt, schema))
    return out


def valid(text: str, schema: dict[str, Any], lenient: bool) -> bool:
    candidates = [text.strip()]
    if lenient:
        fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
        candidates += [fenced.group(1).strip()] if fenced else []
        start, end = text.find("{"), text.rfind("}")
        candidates += [text[start : end + 1]] if 0 <= start < end else []
    for c in candidates:
        try:
            jsonschema.validate(json.loads(c), schema)
            return True
        except (ValueError, jsonschema.ValidationError):
            continue
    return False


def model_path(name: str | None) -> str | None:
    return str(offline_gguf(name)) if name in OFFLINE_GGUFS else name


def run_validity(args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(model_path(args.model), max_num_seqs=16)
    pairs = schema_prompts()[: args.limit]
    convs = [[{"role": "user", "content": p}] for p, _ in pairs]
    result: dict[str, Any] = {"model": llm.engine.model_name, "prompts": len(pairs), "max_tokens": args.max_tokens}
    for mode in ("off", "on"):
        params = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=s) if mode == "on" else None)
                  for _, s in pairs]
        t = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=True)
        texts = [o.outputs[0].text for o in outs]
        result[mode] = {
            "valid_strict": sum(valid(x, s, False) for x, (_, s) in zip(texts, pairs)),
            "valid_lenient": sum(valid(x, s, True) for x, (_, s) in zip(texts, pairs)),
            "finished_by_length": sum(o.outputs[0].finish_reason == "length" for o in outs),
            "mean_output_tokens": statistics.mean(len(o.outputs[0].token_ids) for o in outs),
            "seconds": round(time.perf_counter() - t, 1),
            "examples": texts[:3],
        }
        print(mode, {k: v for k, v in result[mode].items() if k != "examples"}, flush=True)
    return result


# Open-ended (an array of records with no maxItems): a constrained output runs to max_tokens like a free one.
LOG_SCHEMA = _obj({"entries": {"type": "array", "items": _obj({"time": STR, "level": _enum("info", "warn", "error"),
                                                                "message": STR})}})


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"max_tokens": args.max_tokens, "runs": []}
    prompt = "Write a JSON log of a web server's morning, with many entries, as {\"entries\": [...]}."
    constraint = StructuredOutputsParams(json=LOG_SCHEMA)
    for c in args.concurrency:
        llm = LLM(model_path(args.model), max_num_seqs=c)
        result["model"] = llm.engine.model_name
        n = max(2 * c, 4)
        timer = StepTimer(llm.engine)  # counts the steps (one `schedule` each)
        convs = [[{"role": "user", "content": f"{prompt} Server {i}."}] for i in range(n)]
        llm.chat(convs[:c], SamplingParams(max_tokens=8, structured_outputs=constraint))  # warm-up, compile
        for rep in tqdm(range(args.repeats), desc=f"c={c}"):
            for mode in ("off", "on"):
                sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=mode == "off",
                                    structured_outputs=constraint if mode == "on" else None)
                mask0 = llm.engine.grammars.mask_seconds
                timer.reset()
                t = time.perf_counter()
                outs = llm.chat(convs, sp)
                wall = time.perf_counter() - t
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                steps = max(timer.calls["schedule"], 1)
                mask_ms = (llm.engine.grammars.mask_seconds - mask0) / steps * 1e3
                run = {"concurrency": c, "mode": mode, "repeat": rep, "requests": n, "output_tokens": tokens,
                       "seconds": round(wall, 3), "tok_s": round(tokens / wall, 2),
                       "mask_ms_per_step": round(mask_ms, 4), "step_ms": round(wall / steps * 1e3, 3)}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
        for mode in ("off", "on"):
            rates = [r["tok_s"] for r in result["runs"] if r["concurrency"] == c and r["mode"] == mode]
            result[f"c{c}_{mode}_tok_s_median"] = statistics.median(rates)
        result[f"c{c}_ratio"] = round(result[f"c{c}_on_tok_s_median"] / result[f"c{c}_off_tok_s_median"], 3)
        print(f"c={c}: constrained / free = {result[f'c{c}_ratio']}", flush=True)
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["validity", "throughput"])
    p.add_argument("--model", default=None, help=f"a path, or one of {', '.join(OFFLINE_GGUFS)} (default: bundled)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: 400 (validity), 128 (throughput)")
    p.add_argument("--limit", type=int, default=50, help="validity: how many of the 50 prompts")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--result-dir", default="docs/results/structured")


def run(args: argparse.Namespace) -> int:
    args.max_tokens = args.max_tokens or (400 if args.what == "validity" else 128)
    measure = run_validity if args.what == "validity" else run_throughput
    report = run_header(f"tinyserve.structured_{args.what}/1", **measure(args))
    print("wrote", save_json(report, Path(args.result_dir), f"{args.what}-{report['model']}"))
    return 0
