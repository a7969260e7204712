"""The naive baseline peer: transformers `generate`, ONE request at a time, behind an OpenAI-style API.

    python -m tinyserve_lab.baseline_server [--model HF_DIR] [--port 8001]

Deliberately naive (no batching, no paged KV, eager fp32): it is the floor every optimization is
measured against. An asyncio.Lock admits one request; the others queue in front of it. Generation runs
in a thread and streams text per token through a TextIteratorStreamer, so TTFT and ITL are real.
Serves /v1/completions (stream or not, usage, stream_options.include_usage, ignore_eos), /v1/models, /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, TextIteratorStreamer

_END = object()


class TokenStreamer(TextIteratorStreamer):
    """Emits text after every token (the parent holds text back to word boundaries, delaying TTFT);
    holds back only an incomplete UTF-8 sequence. Counts generated tokens."""

    n_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        value = value[0] if value.dim() > 1 else value
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.n_tokens += len(value)
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        assert isinstance(text, str)  # one flat id list decodes to one string
        if len(text) > self.print_len and not text.endswith("\ufffd"):
            self.on_finalized_text(text[self.print_len:])
            self.print_len = len(text)


class StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)


def build_app(model_dir: str, served_name: str, dtype: torch.dtype = torch.float32) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    model.generate(torch.tensor([[eos]]), max_new_tokens=2, do_sample=False, pad_token_id=eos)  # warm-up
    app, lock = FastAPI(title="tinyserve naive baseline"), asyncio.Lock()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "baseline",
                                            "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
            prompt = body.get("prompt", "")
            prompt = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
            ids = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
            max_tokens, temperature = int(body.get("max_tokens") or 16), float(body.get("temperature", 1.0))
            if int(body.get("n", 1)) != 1:
                return error(400, "the baseline serves n=1 only")
        except (ValueError, TypeError, AttributeError) as e:
            return error(400, f"bad request: {e}")
        if not ids or max_tokens < 1 or len(ids) + max_tokens > max_len:
            return error(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) must fit in {max_len}")
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "pad_token_id": eos}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)))
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = max_tokens  # suppresses eos until max_tokens
        streamer = TokenStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stop, loop, seed = threading.Event(), asyncio.get_running_loop(), body.get("seed")

        def work() -> None:  # runs in its own thread and releases the lock when generation is over
            try:
                if seed is not None:
                    torch.manual_seed(int(seed))
                with torch.inference_mode():
                    model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   streamer=streamer, stopping_criteria=[StopOnEvent(stop)], **kw)
            except Exception as e:  # surface as a stream error, keep serving
                streamer.text_queue.put(e)
                streamer.end()
            finally:
                loop.call_soon_threadsafe(lock.release)

        await lock.acquire()
        threading.Thread(target=work, daemon=True).start()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": served_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        async def pieces():
            it = iter(streamer)
            while (piece := await asyncio.to_thread(next, it, _END)) is not _END:
                if isinstance(piece, Exception):
                    raise piece
                if piece:  # end() flushes an empty remainder
                    yield piece

        def finish_reason() -> str:
            return "length" if streamer.n_tokens >= max_tokens else "stop"

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": streamer.n_tokens,
                    "total_tokens": len(ids) + streamer.n_tokens}

        if not body.get("stream"):
            try:
                text = "".join([p async for p in pieces()])
            except Exception as e:
                return error(500, f"generation failed: {e}")
            finally:
                stop.set()
            out = chunk(text, finish_reason())
            return {**out, "usage": usage()}

        async def sse():
            try:
                async for piece in pieces():
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                yield f"data: {json.dumps(chunk('', finish_reason()))}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage()})}\n\n"
            except Exception as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                stop.set()  # client gone or done: stop generating
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF-format dir (default: the bundled model's fp32 export)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from tinyserve.models.gguf import export_gguf
        from tinyserve.models.loader import BUNDLED_NAME, bundled_gguf_path

        args.model = str(export_gguf(bundled_gguf_path()))
        args.served_model_name = args.served_model_name or BUNDLED_NAME
    app = build_app(args.model, args.served_model_name or Path(args.model).name, getattr(torch, args.dtype))
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
