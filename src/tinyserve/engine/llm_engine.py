"""The engine: `step()` = schedule -> run the model -> sample -> append tokens and check stops.

Everything a request needs is validated in `add_request`, before it can reach the step loop, and
each error names the offending field. A failure inside a step fails only the requests it concerns:
a batch whose forward or sampling raised is re-run one sequence at a time, and those that fail alone
are failed (blocks freed, finish_reason "error"); a sequence whose logits are not finite, or whose
token cannot be detokenized, fails alone. The engine carries on with the rest.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tinyserve.attention import ATTENTION_BACKENDS
from tinyserve.attention import prefetch as prefetch_attention
from tinyserve.config import EngineConfig, SpeculativeConfig
from tinyserve.engine.output import request_output
from tinyserve.engine.policy import SchedulingPolicy
from tinyserve.engine.sampler import Sampler, prompt_logprobs
from tinyserve.engine.scheduler import ScheduledBatch, Scheduler
from tinyserve.engine.sequence import Sequence, TokenLogprobs
from tinyserve.errors import EngineFatalError
from tinyserve.kv.block_manager import BlockManager
from tinyserve.kv.disk_tier import DiskTier
from tinyserve.kv.disk_tier import namespace as kv_namespace
from tinyserve.kv.quant import INT8_LAYOUT
from tinyserve.kv.tiers import KVTiers
from tinyserve.layers import QUANTIZATION, bf16_gemm, int8_gemm
from tinyserve.layers import prefetch as prefetch_quantization
from tinyserve.models import eager_ops
from tinyserve.models.loader import ModelSource, model_config, resolve_model
from tinyserve.outputs import RequestOutput
from tinyserve.sampling import SamplingParams
from tinyserve.speculative.decoder import SpecDecoder
from tinyserve.speculative.target import Target
from tinyserve.structured.grammar import Grammars
from tinyserve.tokenizer import IncrementalDetokenizer, TokenText, load_tokenizer
from tinyserve.worker.runner import DECODE_ROWS
from tinyserve.worker.served_model import serve_model, served_quantization

if TYPE_CHECKING:
    from tinyserve.worker.tp_ranks import Ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues and counters, for /metrics."""

    running: int = 0  # requests with a running sequence
    waiting: int = 0  # requests with only waiting sequences
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int = 0  # ... and found there
    spec_decode_num_drafts: int = 0  # speculative verifications so far (one per sequence and step)
    spec_decode_num_draft_tokens: int = 0  # ... the tokens they drafted
    spec_decode_num_accepted_tokens: int = 0  # ... and of those, the ones accepted
    # The KV tiers (kv/tiers.py): (tier, direction, blocks, bytes, seconds) per way blocks move, so far
    kv_tier_traffic: tuple[tuple[str, str, int, int, float], ...] = ()
    kv_swap_fallbacks: int = 0  # preemptions recomputed because the swap space was full
    kv_swap_declined: int = 0  # preemptions recomputed because that measured cheaper than swapping
    kv_offload_corrupt: int = 0  # disk-tier files found torn or corrupt (skipped and removed)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # The knobs that name an implementation fail here, before anything is loaded.
        policy = SchedulingPolicy(config.scheduling_policy, config.aging_tokens_per_s)
        for registry, name in ((ATTENTION_BACKENDS, config.attention_backend), (QUANTIZATION, config.quantization)):
            if name != "auto":
                registry.check(name)
        assert config.num_threads is not None  # resolved in EngineConfig.__post_init__
        torch.set_num_threads(config.num_threads)
        # the attention kernels build while the model loads
        prefetch_attention(config.attention_backend, config.device, config.torch_dtype)
        eager_ops.prefetch(config.torch_dtype, config.device)  # so do the eager steps' norm and SwiGLU
        bf16_gemm.prefetch(config.torch_dtype, config.device)  # and the dense bf16 GEMM's
        if config.int8_compute:
            int8_gemm.prefetch(config.torch_dtype, config.device)  # and int8 compute's
        self.source = src = resolve_model(config.model)
        # the GGUF kernel builds while the tokenizer and the weights load (a cold machine: seconds, once)
        prefetch_quantization(served_quantization(config, config.quantization, src.stored_form), config.device)
        self.model_name = src.name
        self.model_config = mc = model_config(src)
        self.tokenizer = load_tokenizer(src, config.tokenizer, mc.eos_token_ids)
        self.token_text = TokenText(self.tokenizer)  # the decoded_token of logprobs
        dtype = config.torch_dtype

        bs = config.block_size
        block_bytes = mc.kv_bytes_per_token(dtype, config.kv_cache_dtype) * bs
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

        self.speculative = SpeculativeConfig.parse(config.speculative_config)
        # The most rows a step of decode rows alone can have (worker/runner.py): every sequence with
        # 1 + k rows when speculating, or a short chunk over a cached context, within the token budget.
        # The compiled regimes must reach it, or such a step would find no graph.
        k = self.speculative.num_speculative_tokens if self.speculative else 0
        rows = min(config.max_num_batched_tokens, config.max_num_seqs * max(1 + k, DECODE_ROWS))
        compile = config.compile or "blocking"
        if compile == "background" and self.speculative:  # its costs are measured on the step that will serve
            log.info("speculative decoding weighs drafts by the compiled step's cost: compiling before serving")
            compile = "blocking"
        # Tensor parallelism: the other ranks start loading their slices now, alongside this one's.
        self.ranks: Ranks | None = None
        if config.tensor_parallel_size > 1:
            from tinyserve.worker.tp_ranks import Ranks  # torch.distributed: only for tensor parallelism

            self.ranks = Ranks(config, mc, self.max_len, self.num_blocks, rows)
        try:
            served = serve_model(config, src, mc, config.quantization, self.max_len, self.num_blocks, rows, compile,
                                 tp=self.ranks.tp if self.ranks else None)
            if self.ranks:
                self.ranks.wait_ready()
        except BaseException:
            if self.ranks:
                self.ranks.close()
            raise
        self.model, self.runner, self.attention = served.model, served.runner, served.attention
        self.runner.ranks = self.ranks
        self.quantization, self.packed_max_rows = served.quantization, served.packed_max_rows
        self.compile_seconds = served.compile_seconds
        self.blocks = BlockManager(self.num_blocks, bs, config.enable_prefix_caching)
        self.tiers = KVTiers(self.runner.kv_caches, int(config.swap_space_gb * 2**30))
        self.tiers.disk = self._disk_tier(src, self.tiers.block_nbytes)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
                                   policy, prefill_chunk=config.prefill_chunk, tiers=self.tiers,
                                   swap=config.preemption_mode == "swap")
        self.scheduler.always_swap = config.batch_invariant
        # The disk tier's queued writes finish at close(), or when the engine is collected or the
        # interpreter exits (an offline LLM(...) is never closed explicitly).
        self._close_tiers = weakref.finalize(self, self.tiers.close)
        self._close_ranks = weakref.finalize(self, self.ranks.close) if self.ranks else None
        # Structured outputs: nothing is imported or built until the first request asks for a grammar.
        self.grammars = Grammars(self.tokenizer.hf, mc.vocab_size, self.tokenizer.eos_token_ids)
        self.sampler = Sampler(self.tokenizer.eos_token_ids, config.seed, self.runner.device, self.grammars)
        self.spec = None
        if self.speculative:
            target = Target(config, src, mc, self.quantization, self.max_len, self.num_blocks, self.runner,
                            self.sampler.probs)
            self.spec = SpecDecoder.build(self.speculative, target)
        self.requests: dict[str, list[Sequence]] = {}

    def _disk_tier(self, src: ModelSource, block_nbytes: int) -> DiskTier | None:
        """The prefix cache's disk tier, if asked for: its namespace is everything a block's bytes
        depend on besides its tokens, so blocks of another model, weight mode or KV format never alias."""
        config = self.config
        if not config.kv_offload_path:
            return None
        root = Path(config.kv_offload_path)
        try:  # a path that cannot hold the tier fails the start, not the first request
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            raise ValueError(f"kv_offload_path {str(root)!r} cannot hold the disk tier: {e}") from None
        weights = sorted((p.name, p.stat().st_size) for p in
                         ([src.gguf_file] if src.gguf_file else src.path.glob("*.safetensors")))
        kv_format = INT8_LAYOUT if config.kv_cache_dtype == "int8" else config.kv_cache_dtype
        ns = kv_namespace(self.model_config.to_hf(), weights, self.quantization, str(config.torch_dtype),
                          kv_format, config.block_size)
        return DiskTier(config.kv_offload_path, ns, int(config.kv_offload_gb * 2**30), block_nbytes)

    def close(self) -> None:
        """Finish what must outlive the engine (the disk tier's queued writes); stop the other ranks."""
        self._close_tiers()
        if self._close_ranks is not None:
            self._close_ranks()

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
        # A server compiled it before queueing (AsyncEngine): here a cache hit. Offline, compiled now.
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
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
                grammar=None if grammar is None else self.grammars.matcher(grammar),
            ))
        self.scheduler.add(seqs)  # raises QueueFullError when the bounded queue is full
        self.requests[request_id] = seqs
        return seqs

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.get(request_id, []):
            if not seq.finished:
                seq.finish("abort")
                self.scheduler.finish(seq)

    def fail_request(self, request_id: str, message: str) -> None:
        """Fail what is left of a request (its blocks go back at once); the client is told `message`."""
        for seq in self.requests.get(request_id, []):
            if not seq.finished:
                self._fail(seq, message)

    def get_request(self, request_id: str) -> list[Sequence]:
        """The request's n sequences (empty once it is forgotten, or if it never was)."""
        return self.requests.get(request_id, [])

    def is_finished(self, request_id: str) -> bool:
        seqs = self.requests.get(request_id, [])
        return bool(seqs) and all(s.finished for s in seqs)

    def pop_output(self, request_id: str) -> RequestOutput:
        """The request's output; forgets the request once it has finished."""
        seqs = self.requests[request_id]
        out = request_output(request_id, seqs, self.token_text)
        if out.finished:
            del self.requests[request_id]
        return out

    def forget_request(self, request_id: str) -> None:
        """Forget a finished request without building its output (a server has streamed it already)."""
        if self.is_finished(request_id):
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_capacity(self, num_seqs: int = 1) -> bool:
        """Whether the bounded waiting queue takes `num_seqs` more sequences now (a request of n samples: n)."""
        return len(self.scheduler.waiting) + num_seqs <= self.config.max_waiting

    @property
    def compiled_step(self) -> str:
        """off | building | ready | failed: whether decode steps run the compiled graph (config.compile)."""
        return self.runner.compiled_step

    def stats(self) -> EngineStats:
        running = {s.request_id for s in self.scheduler.running}
        waiting = {s.request_id for s in self.scheduler.waiting} - running
        spec = self.spec.stats if self.spec is not None else None
        tiers = self.tiers.stats
        return EngineStats(
            len(running), len(waiting), float(self.blocks.usage), self.blocks.stats.queries, self.blocks.stats.hits,
            *((spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) if spec else (0, 0, 0)),
            kv_tier_traffic=tuple((tier, way, t.blocks, t.bytes, t.seconds)
                                  for (tier, way), t in tiers.traffic.items()),
            kv_swap_fallbacks=tiers.swap_fallbacks,
            kv_swap_declined=tiers.swap_declined,
            kv_offload_corrupt=self.tiers.disk.stats.corrupt if self.tiers.disk is not None else 0,
        )

    # -- the step loop ------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One forward pass over the scheduled batch; returns the sequences that got a token or ended."""
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)  # drafts for the decodes, before they are scheduled
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            return self._step(batch)
        finally:
            if self.spec is not None:
                for seq in batch.seqs:  # drafts live for one step
                    seq.spec_token_ids, seq.spec_draft_probs = [], None
                self.spec.forget({*self.scheduler.running, *self.scheduler.waiting})

    def _step(self, batch: ScheduledBatch) -> list[Sequence]:
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
        started = time.perf_counter()
        out = self.runner.execute(batch.seqs, batch.num_tokens)
        self._measure_prefill(batch, time.perf_counter() - started)
        sampling, logits = out.sampling, out.logits
        rows = [1 + len(s.spec_token_ids) for s in sampling]  # a speculating sequence verifies k + 1 rows
        bad: list[Sequence] = []
        if sampling:
            # A row's sum is finite iff the row is (fp32 logits of any sane model cannot overflow it).
            finite = torch.isfinite(logits.sum(-1)).tolist()
            if not all(finite):
                ends = list(itertools.accumulate(rows))
                ok = [all(finite[e - n : e]) for e, n in zip(ends, rows)]
                bad = [s for s, good in zip(sampling, ok) if not good]
                keep = [r for e, n, good in zip(ends, rows, ok) if good for r in range(e - n, e)]
                sampling, logits = [s for s, good in zip(sampling, ok) if good], logits[keep]
        tokens, logprobs = self.sampler.sample(logits, sampling, [s.spec_token_ids for s in sampling],
                                               [s.spec_draft_probs for s in sampling]) if sampling else ([], [])
        scored = prompt_logprobs(out.prompt_logits, out.prompt_spans)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            # A speculating sequence commits with its tokens, below; a sequence with non-finite logits
            # fails, and its K/V must not become findable (nor reach the disk tier).
            if not seq.spec_token_ids and seq not in bad:
                self.scheduler.computed(seq, n)
        for (seq, _), scored_lps in zip(out.prompt_spans, scored):
            seq.prompt_logprobs += scored_lps
        for seq in bad:
            self._fail(seq, "the model produced non-finite logits (NaN or inf)")
        for seq, toks, lps in zip(sampling, tokens, logprobs):
            try:
                if seq.spec_token_ids:
                    self._commit_speculation(seq, toks, lps)
                else:
                    self._append(seq, toks[0], lps[0])
            except Exception as e:
                self._fail(seq, e)
        return out.sampling

    def _measure_prefill(self, batch: ScheduledBatch, seconds: float) -> None:
        """The prefill's seconds per token, for the scheduler's swap-or-recompute choice: a moving
        average over steps that are mostly prefill (at least 32 tokens, at least twice the rows)."""
        tokens = sum(batch.num_tokens)
        if tokens < max(32, 2 * len(batch)) or any(s.spec_token_ids for s in batch.seqs):  # not verifications
            return
        now, last = seconds / tokens, self.scheduler.prefill_seconds_per_token
        self.scheduler.prefill_seconds_per_token = now if last is None else 0.8 * last + 0.2 * now

    def _commit_speculation(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs | None]) -> None:
        """Emit a verified run: the accepted drafts then the target's own token, each through the stop
        checks (a stop ends the run there: nothing after it is emitted). The K/V that stays is the
        last token's and the accepted drafts'; the rejected drafts' slots are given back."""
        assert self.spec is not None
        drafted, accepted = len(seq.spec_token_ids), len(tokens) - 1
        self.spec.record(seq, drafted, accepted)
        reason = None
        emitted = 0
        for token, lp in zip(tokens, logprobs):
            emitted += 1
            reason = self._add_token(seq, token, lp)
            if reason is not None:
                break
        self.scheduler.computed(seq, 1 + min(emitted, accepted))
        if reason is not None:
            seq.finish(*reason)
            self.scheduler.finish(seq)
        else:
            self.scheduler.rolled_back(seq)

    def _fail(self, seq: Sequence, error: Exception | str) -> None:
        """Fail one sequence (its blocks go back at once); the client sees `error`, the log says why."""
        message = error if isinstance(error, str) else f"internal error: {type(error).__name__}: {error}"
        log.error("request %s failed: %s", seq.request_id, message)
        seq.error = message
        seq.finish("error")
        self.scheduler.finish(seq)

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprobs | None) -> None:
        reason = self._add_token(seq, token, logprob)
        if reason is not None:
            seq.finish(*reason)
            self.scheduler.finish(seq)

    def _add_token(self, seq: Sequence, token: int,
                   logprob: TokenLogprobs | None) -> tuple[str, int | str | None] | None:
        """Append one token and its text; why the sequence must stop now, if it must."""
        if seq.grammar is not None and not seq.grammar.accept(token):  # the mask makes this unreachable
            raise RuntimeError(f"token {token} breaks the request's grammar")
        seq.token_ids.append(token)
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text_before = len(seq.output_text)
        seq.output_text += seq.detokenizer.step(token)
        return self._stop_reason(seq, token, text_before)

    def _stop_reason(self, seq: Sequence, token: int, text_before: int) -> tuple[str, int | str | None] | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if seq.grammar is not None and seq.grammar.terminated:  # its stop token: the output is complete
            return "stop", None
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
