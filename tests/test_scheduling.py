"""Scheduling policies, driven on the scheduler alone with a fake clock (no model): admission order,
preemption victims and aging are exact and deterministic; plus priority through `LLM.generate`."""

from __future__ import annotations

import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.engine.policy import SchedulingPolicy
from tinyserve.engine.scheduler import Scheduler
from tinyserve.engine.sequence import Sequence
from tinyserve.kv.block_manager import BlockManager

from conftest import TINY  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def seq(rid: str, prompt_len: int, arrival: float, priority: int = 0, max_tokens: int = 2) -> Sequence:
    return Sequence(request_id=rid, prompt=None, prompt_token_ids=[rid.__hash__() % 1000 + 3] * prompt_len,
                    params=SamplingParams(max_tokens=max_tokens), detokenizer=None,  # type: ignore[arg-type]
                    max_len=4096, arrival_time=arrival, priority=priority)


class Sim:
    """The engine's step loop without a model: every fed token is computed, a sequence whose tokens
    are all computed samples one, and it finishes after max_tokens."""

    def __init__(self, policy: str, num_blocks: int = 256, max_num_seqs: int = 8, budget: int = 64,
                 aging: float = 1000.0) -> None:
        self.clock = Clock()
        self.sched = Scheduler(BlockManager(num_blocks, 4), max_num_seqs, budget, 1024,
                               SchedulingPolicy(policy, aging), clock=self.clock)
        self.admitted: list[str] = []
        self.first_token: dict[str, float] = {}
        self.preempted: list[str] = []

    def step(self, dt: float = 0.01) -> None:
        batch = self.sched.schedule()
        self.preempted += [s.request_id for s in batch.preempted]
        for s, n in zip(batch.seqs, batch.num_tokens):
            if s.request_id not in self.admitted:
                self.admitted.append(s.request_id)
            self.sched.computed(s, n)
            if s.num_computed == s.num_tokens:
                s.token_ids.append(1)
                s.output_token_ids.append(1)
                self.first_token.setdefault(s.request_id, self.clock.t)
                if len(s.output_token_ids) >= (s.params.max_tokens or 0):
                    s.finish("length")
                    self.sched.finish(s)
        self.clock.t += dt

    def run(self, seqs: list[Sequence], steps: int) -> Sim:
        self.sched.add(seqs)
        for _ in range(steps):
            self.step()
        return self


def test_fcfs_admits_in_arrival_order():
    sim = Sim("fcfs", max_num_seqs=1).run([seq("c", 8, 0.3), seq("a", 8, 0.1), seq("b", 30, 0.2)], 20)
    assert sim.admitted == ["a", "b", "c"]


def test_priority_admits_lower_value_first_then_arrival():
    seqs = [seq("p3", 8, 0.0, 3), seq("p1-early", 8, 0.1, 1), seq("p2", 8, 0.2, 2), seq("p1-late", 8, 0.3, 1),
            seq("neg", 8, 0.4, -5)]
    sim = Sim("priority", max_num_seqs=1).run(seqs, 30)
    assert sim.admitted == ["neg", "p1-early", "p1-late", "p2", "p3"]


def test_preemption_takes_the_lowest_priority_not_the_latest():
    # 4 blocks of 4 tokens; two sequences of 6 tokens that each grow to 6 + 4: one must be preempted
    pair = [seq("low", 6, 0.0, priority=9, max_tokens=4), seq("high", 6, 0.5, priority=0, max_tokens=4)]
    sim = Sim("priority", num_blocks=4).run(pair, 20)
    assert sim.preempted and set(sim.preempted) == {"low"}
    fcfs = Sim("fcfs", num_blocks=4).run([seq("first", 6, 0.0, max_tokens=4), seq("latest", 6, 0.5, max_tokens=4)], 20)
    assert fcfs.preempted and set(fcfs.preempted) == {"latest"}


def test_shortest_serves_short_prompts_before_a_long_document():
    sim = Sim("shortest", max_num_seqs=1).run([seq("doc", 400, 0.0), seq("q1", 10, 0.01), seq("q2", 12, 0.02)], 40)
    assert sim.admitted == ["q1", "q2", "doc"]


@pytest.mark.parametrize("aging", [1000.0, 0.0])
def test_aging_bounds_the_wait_of_a_long_prompt(aging):
    """A new short request every other step keeps the one slot busy forever (each takes two steps);
    with aging the 300-token document overtakes the newcomers after 300 / 1000 s, then its prefill
    takes 5 steps of 64 tokens; without aging it starves."""
    sim = Sim("shortest", max_num_seqs=1, aging=aging)
    sim.sched.add([seq("doc", 300, 0.0)])
    for i in range(200):  # 2 simulated seconds
        if i % 2 == 0:
            sim.sched.add([seq(f"q{i}", 10, sim.clock.t)])
        sim.step()
    if aging:
        assert "doc" in sim.first_token and sim.first_token["doc"] <= 300 / aging + 0.1
    else:
        assert "doc" not in sim.admitted


def test_priority_through_generate(tiny_llama_dir):
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    fcfs = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32)
    with pytest.raises(ValueError, match="priority"):
        fcfs.generate(["a b", "c d"], greedy, priority=[0, 1])
    with pytest.raises(ValueError, match="priority: got 1 for 2"):
        fcfs.generate(["a b", "c d"], greedy, priority=[0])
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, scheduling_policy="priority", max_num_seqs=1)
    prompts = ["one two three", "four five", "six seven eight nine"]
    outs = llm.generate(prompts, greedy, priority=[2, 0, 1])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in fcfs.generate(prompts, greedy)]


def test_priority_order_in_the_engine(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, scheduling_policy="priority", max_num_seqs=1)
    e = llm.engine
    for rid, prio in [("late-low", 5), ("mid", 1), ("urgent", -1)]:
        e.add_request(rid, "tokens to prefill", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), prio)
    order: list[str] = []
    while e.has_unfinished():
        order += [s.request_id for s in e.step() if s.request_id not in order]
    assert order == ["urgent", "mid", "late-low"]


@pytest.mark.parametrize("policy", ["shortest", "fcfs"])
def test_a_short_newcomer_goes_ahead_of_a_running_documents_chunks(policy):
    """A 400-token document is mid-prefill (64-token budget per step) when a 10-token question
    arrives: under shortest the question's prefill takes the next step's budget first; under fcfs
    it waits for the document's remaining chunks."""
    sim = Sim(policy, budget=64)
    sim.sched.add([seq("doc", 400, 0.0)])
    sim.step()
    sim.step()
    arrival = sim.clock.t
    sim.sched.add([seq("q", 10, arrival)])
    for _ in range(20):
        sim.step()
    wait_steps = round((sim.first_token["q"] - arrival) / 0.01)
    assert wait_steps == 0 if policy == "shortest" else wait_steps >= 4
