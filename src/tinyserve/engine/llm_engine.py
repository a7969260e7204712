"""The engine: `step()` = schedule -> run the model -> sample -> append tokens and check stops.

Everything a request needs is validated in `add_request`, before it can reach the step loop, and
each error names the offending field. A failure inside a step fails only the requests it concerns:
a batch whose forward or sampling raised is re-run one sequence at a time, and those that fail alone
are failed (blocks freed, finish_reason "error"); a sequence whose logits are not finite, or whose
token cannot be detokenized, fails alone. The engine carries on with the rest.
"""

from __future__ import annotations

import logging
import time

import torch

from tinyserve.attention import select_backend
from tinyserve.config import EngineConfig, cpu_model
from tinyserve.engine.compiled import CompiledDecode
from tinyserve.engine.faults import EngineFatalError, FaultInjector
from tinyserve.engine.output import request_output
from tinyserve.engine.policy import SchedulingPolicy
from tinyserve.engine.runner import ModelRunner
from tinyserve.engine.sampler import Sampler, prompt_logprobs
from tinyserve.engine.scheduler import ScheduledBatch, Scheduler
from tinyserve.engine.sequence import Sequence
from tinyserve.kv.block_manager import BlockManager
from tinyserve.layers.quant import configure_packed_kernels, packed_weights
from tinyserve.models.loader import cache_dir, load_model, model_config, resolve_model, resolve_quantization
from tinyserve.outputs import Logprob, RequestOutput
from tinyserve.sampling import SamplingParams
from tinyserve.tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        assert config.num_threads is not None  # resolved in EngineConfig.__post_init__
        torch.set_num_threads(config.num_threads)
        src = resolve_model(config.model)
        self.model_name = src.name
        self.model_config = mc = model_config(src)
        self.tokenizer = load_tokenizer(src, config.tokenizer, mc.eos_token_ids)
        dtype, device = config.torch_dtype, config.device

        bs = config.block_size
        block_bytes = mc.kv_bytes_per_token(dtype) * bs
        self.num_blocks = config.num_kv_blocks or int(config.kv_cache_memory_gb * 2**30 // block_bytes)
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_gb={config.kv_cache_memory_gb} is too small for one block of {bs} tokens"
            )
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) exceeds the model's context ({mc.max_position_embeddings})"
            )
        wanted = config.max_model_len or mc.max_position_embeddings
        # One sequence of max_len must always fit the pool: that is what makes preemption safe.
        self.max_len = min(wanted, self.num_blocks * bs)
        if self.max_len < wanted:
            log.warning("max_model_len capped at %d tokens: the KV pool holds no more", self.max_len)

        self.quantization = resolve_quantization(config.quantization, src, dtype, device)
        self.attention = select_backend(config.attention_backend, device)
        self.model = load_model(src, mc, self.max_len, dtype, device, self.quantization, config.quant_group_size,
                                self.attention)
        # The packed/dense crossover depends on the machine, the model and the mode: measured once, cached.
        machine = f"{cpu_model()}|{config.device}|{config.num_threads} threads|torch {torch.__version__}"
        key = f"{src.path}|{self.quantization}|g{config.quant_group_size}|{dtype}|{machine}"
        self.packed_max_batch = configure_packed_kernels(
            self.model, config.packed_max_batch, config.max_num_batched_tokens, dtype,
            cache=(cache_dir() / "kernel-choice.json", key))
        self.runner = ModelRunner(self.model, mc, self.num_blocks, bs, dtype, device)
        self.compile_seconds = 0.0
        self.runner.compiled = self._compile_decode()
        self.blocks = BlockManager(self.num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
                                   SchedulingPolicy(config.scheduling_policy, config.aging_tokens_per_s))
        self.sampler = Sampler(self.tokenizer.eos_token_ids, config.seed, self.runner.device)
        self.requests: dict[str, list[Sequence]] = {}
        self.faults = FaultInjector.from_env(self.tokenizer.decode)  # None unless a test asks for faults

    def _compile_decode(self) -> CompiledDecode | None:
        """The compiled decode step, warmed up at start-up for every batch-size regime (None with
        --enforce-eager): batch 1, 2+, and above the quantized linears' packed/dense crossover."""
        if self.config.enforce_eager:
            return None
        top = self.config.max_num_seqs
        sizes = {1, 2}
        if any(w.dense is not None for _, w in packed_weights(self.model)):
            sizes.add(self.packed_max_batch + 1)  # the first batch that runs the dense copies
        compiled = CompiledDecode(self.model, self.config.block_size)
        self.compile_seconds = compiled.warm_up(self.runner.kv_caches, self.attention.index_dtype,
                                                sorted(b for b in sizes if b <= top))
        return compiled

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids: token id {bad[0]!r} is out of range [0, {vocab})")
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens; the context holds {self.max_len}, including at least one generated token"
            )
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check on its own: the limits of this model and engine."""
        vocab = self.model_config.vocab_size
        assert params.stop_token_ids is not None  # a list after SamplingParams.__post_init__
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < {vocab}")
        if params.n > self.config.max_waiting:  # it could never be queued (QueueFullError means 'retry')
            raise ValueError(
                f"n ({params.n}) exceeds the waiting queue's capacity (max_waiting={self.config.max_waiting})"
            )

    def check_priority(self, priority: int) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and not self.scheduler.policy.uses_priority:  # as vLLM: not silently ignored
            raise ValueError(f"priority is only honoured with scheduling_policy='priority' "
                             f"(this engine runs {self.scheduler.policy.name!r})")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0) -> list[Sequence]:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_priority(priority)
        ids = self.encode_prompt(prompt)
        self.check_params(params)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:  # each of the n samples gets its own stream
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seqs.append(Sequence(
                request_id=request_id,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=ids,
                params=params,
                detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                max_len=self.max_len,
                arrival_time=now,
                index=i,
                priority=priority,
                generator=gen,
            ))
        self.scheduler.add(seqs)  # raises QueueFullError when the bounded queue is full
        self.requests[request_id] = seqs
        return seqs

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.get(request_id, []):
            if not seq.finished:
                seq.finish("abort")
                self.scheduler.finish(seq)

    def pop_output(self, request_id: str) -> RequestOutput:
        """The request's output; forgets the request once it has finished."""
        seqs = self.requests[request_id]
        out = request_output(request_id, seqs)
        if out.finished:
            del self.requests[request_id]
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step loop ------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One forward pass over the scheduled batch; returns the sequences that got a token or ended."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self.faults is not None:
            self.faults.maybe_raise("fatal", batch.seqs)
        try:
            return self._run(batch)
        except EngineFatalError:
            raise
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch.seqs[0], e)
                return batch.seqs
            # Which sequence broke it? Each alone: a failed attempt changed no sequence, and re-running
            # rewrites the same KV slots, so the rest get exactly the tokens the batch would have given.
            log.warning("a step of %d sequences failed (%s: %s); running them one by one", len(batch),
                        type(e).__name__, e)
        done: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            try:
                done += self._run(ScheduledBatch([seq], [n]))
            except EngineFatalError:
                raise
            except Exception as e:
                self._fail(seq, e)
                done.append(seq)
        return done

    def _run(self, batch: ScheduledBatch) -> list[Sequence]:
        """Forward, sample, then commit. Everything that can raise comes before the commit, so a raise
        leaves the sequences as they were."""
        if self.faults is not None:
            self.faults.maybe_raise("forward", batch.seqs)
        out = self.runner.execute(batch)
        sampling, logits = out.sampling, out.logits
        if self.faults is not None:
            self.faults.poison(logits, sampling)
        bad: list[Sequence] = []
        if sampling:
            # A row's sum is finite iff the row is (fp32 logits of any sane model cannot overflow it).
            finite = torch.isfinite(logits.sum(-1)).tolist()
            if not all(finite):
                bad = [s for s, ok in zip(sampling, finite) if not ok]
                keep = [i for i, ok in enumerate(finite) if ok]
                sampling, logits = [sampling[i] for i in keep], logits[keep]
        if self.faults is not None:
            self.faults.maybe_raise("sampler", sampling)
        tokens, logprobs = self.sampler(logits, sampling) if sampling else ([], [])
        scored = prompt_logprobs(out.prompt_logits, out.prompt_spans)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            self.scheduler.computed(seq, n)
        for (seq, _), lps in zip(out.prompt_spans, scored):
            seq.prompt_logprobs += lps
        for seq in bad:
            self._fail(seq, "the model produced non-finite logits (NaN or inf)")
        for seq, token, lp in zip(sampling, tokens, logprobs):
            try:
                if self.faults is not None:
                    self.faults.maybe_raise("detokenize", [seq])
                self._append(seq, token, lp)
            except Exception as e:
                self._fail(seq, e)
        return out.sampling

    def _fail(self, seq: Sequence, error: Exception | str) -> None:
        """Fail one sequence (its blocks go back at once); the client sees `error`, the log says why."""
        message = error if isinstance(error, str) else f"internal error: {type(error).__name__}: {error}"
        log.error("request %s failed: %s", seq.request_id, message)
        seq.error = message
        seq.finish("error")
        self.scheduler.finish(seq)

    def _append(self, seq: Sequence, token: int, logprob: Logprob | None) -> None:
        seq.token_ids.append(token)
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text_before = len(seq.output_text)
        seq.output_text += seq.detokenizer.step(token)
        reason = self._stop_reason(seq, token, text_before)
        if reason is not None:
            seq.finish(*reason)
            self.scheduler.finish(seq)

    def _stop_reason(self, seq: Sequence, token: int, text_before: int) -> tuple[str, int | str | None] | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
                return "stop", None
            assert p.stop_token_ids is not None  # a list after SamplingParams.__post_init__
            if token in p.stop_token_ids:  # like vLLM: the stop token's text is not output unless asked
                if not p.include_stop_str_in_output:
                    seq.output_text = seq.output_text[:text_before]
                return "stop", token
            if p.stop_strings:
                # A stop string may straddle tokens: search from where a new match could begin.
                start = max(0, text_before - max(map(len, p.stop_strings)) + 1)
                hits = [(i, s) for s in p.stop_strings if (i := seq.output_text.find(s, start)) != -1]
                if hits:
                    i, s = min(hits)
                    seq.output_text = seq.output_text[: i + (len(s) if p.include_stop_str_in_output else 0)]
                    return "stop", s
        if n_out >= seq.max_output_tokens():
            return "length", None
        return None
