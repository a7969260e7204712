"""Request routers for Ray Serve's pluggable routing (its public `RequestRouter` API); `pow2` is Ray's own.

A router returns ranks of candidate replicas; Ray then probes their queue lengths and sends the request to
the least loaded replica of the first rank that accepts it. So a router says *where a request would be
best served*, and Ray does the load accounting, probing, retries and back-off.

Ray ships a prefix-aware router too (ray.serve.llm's PrefixCacheAffinityRouter), but it imports Ray's
LLM stack, which requires vLLM or SGLang to be installed; ours is the same policy (SGLang's router's,
llm-d's) in a page, over a per-replica index of the prompts it was sent.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

CHUNK = 64  # characters per prefix-index entry: a prefix matches to a multiple of this


def prompt_of(request: PendingRequest | None) -> str:
    """The text the request's KV cache starts with (`RoutedRequest.prompt`: replicas/service.py)."""
    if request is None or not request.args:
        return ""
    prompt = getattr(request.args[0], "prompt", "")
    return prompt if isinstance(prompt, str) else ""


def chunk_hashes(text: str) -> list[int]:
    """One hash per whole CHUNK of `text`, each covering everything before it: equal hashes mean equal prefixes."""
    out: list[int] = []
    h = 0
    for i in range(CHUNK, len(text) + 1, CHUNK):
        h = hash((h, text[i - CHUNK: i]))
        out.append(h)
    return out


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """A request goes to the replica that was sent the longest prefix of it before, where its prefix cache
    most likely still holds those blocks, unless that would overload it: when the replicas' queue lengths
    differ by more than `imbalanced_threshold`, or no replica matches `match_rate_threshold` of the prompt,
    every replica is a candidate and Ray picks the least loaded. The index remembers `capacity` chunks per
    replica, least recently used first out (an engine's prefix cache forgets too)."""

    def initialize_state(self, imbalanced_threshold: int = 8, match_rate_threshold: float = 0.1,  # type: ignore[override]
                         capacity: int = 100_000) -> None:  # Ray passes `request_router_kwargs` here by name
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.capacity = capacity
        self.index: dict[ReplicaID, OrderedDict[int, None]] = {}

    def matched_chunks(self, replica: ReplicaID, hashes: list[int]) -> int:
        seen = self.index.get(replica, OrderedDict())
        return next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        text = prompt_of(pending_request)
        loads = [self.replica_queue_len_cache.get(r.replica_id) or 0 for r in candidate_replicas]
        if text and max(loads) - min(loads) <= self.imbalanced_threshold:
            hashes = chunk_hashes(text)
            matched = [self.matched_chunks(r.replica_id, hashes) for r in candidate_replicas]
            best = max(matched)
            if best and best * CHUNK / len(text) >= self.match_rate_threshold:
                first = [r for r, m in zip(candidate_replicas, matched) if m == best]
                return [first, [r for r in candidate_replicas if r not in first]]
        return [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        seen = self.index.setdefault(replica_id, OrderedDict())
        for h in chunk_hashes(prompt_of(pending_request)):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.pop(replica_id, None)  # its replacement starts with an empty cache


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Each request to the next replica in a fixed order: the baseline a cache-aware router must beat
    (it spreads a conversation's turns over every replica, so each prefix is computed N times)."""

    _turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[next(self._turn) % len(ordered)]]]
