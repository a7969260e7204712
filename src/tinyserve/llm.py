"""`LLM`: offline batched generation with vLLM's interface."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq
from typing import Any, cast

from tqdm import tqdm

from tinyserve.config import EngineConfig
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.outputs import RequestOutput
from tinyserve.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model=None | path | hub_id, dtype=..., device=..., **engine_knobs)`; see EngineConfig."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu", **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **kwargs))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop what the engine started beside this process (tensor-parallel ranks) and flush its disk
        tier; also done when the LLM is collected or the interpreter exits."""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs come back in input order.
        `priority` (one per prompt, lower first) needs scheduling_policy='priority', as in vLLM."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        # By now a batch; the checker cannot tell a token-id list from a list of prompts by their elements.
        prompts = list(cast(Seq[Prompt], prompts))
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority: got {len(priorities)} for {len(prompts)} prompts")
        for p, sp, prio in zip(prompts, params_list, priorities):  # fail before anything is queued
            self.engine.encode_prompt(p)
            self.engine.check_params(sp)
            if sp.structured_outputs is not None:  # an invalid schema fails here, before anything runs
                self.engine.grammars.compile(sp.structured_outputs)
            self.engine.check_priority(prio)
        return self._run(list(zip(prompts, params_list, priorities)), use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, work: list[tuple[Prompt, SamplingParams, int]], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = [f"offline-{next(self._ids)}" for _ in work]
        pending = deque((rid, prompt, params, prio) for rid, (prompt, params, prio) in zip(ids, work))
        outputs: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(work), desc="generate", disable=not use_tqdm)
        try:
            while pending or len(outputs) < len(work):
                while pending and engine.has_capacity(pending[0][2].n):  # feed the bounded queue as it drains
                    engine.add_request(*pending.popleft())
                for rid in {s.request_id for s in engine.step() if s.finished}:
                    if engine.is_finished(rid):
                        outputs[rid] = engine.pop_output(rid)
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if engine.get_request(rid):
                    engine.abort_request(rid)
                    engine.pop_output(rid)
            raise
        finally:
            bar.close()
        return [outputs[rid] for rid in ids]
