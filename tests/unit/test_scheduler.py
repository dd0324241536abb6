"""Scheduler policy, driven with real Requests whose entries are fakes (no torch, no engine)."""

from dataclasses import dataclass
from types import SimpleNamespace

from services.worker.engine.scheduler import Admission, Scheduler
from services.worker.engine.sequence import Request, SamplingParams, Status
from services.worker.kv.store import SequenceEntry


class FakeEngine:
    """The admit callback plus what the engine does after a step (advance KV, sample)."""

    def __init__(self, prompt_lens: dict[str, int] | None = None):
        self.prompt_lens = prompt_lens or {}
        self.no_room: set[str] = set()   # request names answered NO_ROOM
        self.reject: set[str] = set()
        self.calls: list[str] = []
        self.scheduler: Scheduler | None = None

    def admit(self, req: Request) -> Admission:
        self.calls.append(req.name)
        if self.scheduler is not None:
            # The engine tells a rejected request so from here: by then it must not count as
            # waiting any more (its client may send the next request at once).
            assert req not in self.scheduler.waiting
        if req.name in self.no_room:
            return Admission.NO_ROOM
        if req.name in self.reject:
            req.status = Status.FINISHED
            return Admission.REJECTED
        n = self.prompt_lens.get(req.name, 4)
        req.entry = SequenceEntry(req.seq_id, token_ids=[0] * n, kv=SimpleNamespace(num_tokens=0))
        return Admission.ADMITTED

    @staticmethod
    def advance(items) -> None:
        sampled = [item.samples for item in items]  # decided before the KV advances
        for item, sample in zip(items, sampled):
            item.request.entry.kv.num_tokens += item.num_tokens
            if sample:
                item.request.entry.token_ids.append(1)


@dataclass(eq=False)
class NamedRequest(Request):
    """A Request with a name for the assertions; its context comes from FakeEngine.admit."""
    name: str = ""


def request(name: str, seq_id: str | None = None) -> Request:
    return NamedRequest(seq_id=seq_id or name, token_ids=[], prompt_tokens=0, params=SamplingParams(),
                        sink=lambda e: None, name=name)


def make(engine: FakeEngine, max_batch_size: int = 4, max_batch_tokens: int = 64) -> Scheduler:
    engine.scheduler = Scheduler(engine.admit, max_batch_size, max_batch_tokens)
    return engine.scheduler


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


def test_fifo_admission_up_to_max_batch_size():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=3)
    for i in range(5):
        sched.add(request(f"r{i}"))
    items = sched.schedule()
    assert names(sched.running) == ["r0", "r1", "r2"]
    assert names(sched.waiting) == ["r3", "r4"]
    assert [i.request.name for i in items] == ["r0", "r1", "r2"]
    assert all(r.status is Status.RUNNING for r in sched.running)
    assert engine.calls == ["r0", "r1", "r2"]  # nobody past the free slots is even asked
    sched.remove(sched.running[0])
    sched.schedule()
    assert names(sched.running) == ["r1", "r2", "r3"] and names(sched.waiting) == ["r4"]


def test_same_sequence_waits_while_busy_and_others_pass():
    engine = FakeEngine()
    sched = make(engine)
    first, second, other = request("first", "s"), request("second", "s"), request("other", "t")
    for r in (first, second, other):
        sched.add(r)
    sched.schedule()
    assert names(sched.running) == ["first", "other"]
    assert names(sched.waiting) == ["second"]
    assert "second" not in engine.calls
    sched.schedule()
    assert names(sched.waiting) == ["second"]  # still busy
    sched.remove(first)
    sched.schedule()
    assert names(sched.running) == ["other", "second"] and not sched.waiting


def test_no_room_stops_admission_in_order():
    engine = FakeEngine()
    engine.no_room = {"big"}
    sched = make(engine, max_batch_size=8)
    for r in (request("a"), request("big"), request("small")):
        sched.add(r)
    sched.schedule()
    assert names(sched.running) == ["a"]
    assert names(sched.waiting) == ["big", "small"]  # small does not overtake big
    assert "small" not in engine.calls
    engine.no_room.clear()
    sched.schedule()
    assert names(sched.running) == ["a", "big", "small"]


def test_no_room_keeps_the_queue_order_behind_busy_sequences():
    engine = FakeEngine()
    sched = make(engine, max_batch_size=8)
    for r in (request("first", "s"), request("second", "s"), request("big"), request("small")):
        sched.add(r)
    engine.no_room = {"big"}
    sched.schedule()
    assert names(sched.running) == ["first"]
    assert names(sched.waiting) == ["second", "big", "small"]
    sched.schedule()  # asked again at every step, and still in its place
    assert names(sched.waiting) == ["second", "big", "small"]
    assert engine.calls.count("big") == 2


def test_rejected_requests_leave_the_queue():
    engine = FakeEngine()
    engine.reject = {"bad"}
    sched = make(engine)
    for r in (request("bad"), request("good")):
        sched.add(r)
    sched.schedule()
    assert names(sched.running) == ["good"] and not sched.waiting


def test_decodes_are_scheduled_before_prefills():
    engine = FakeEngine({"old": 3, "new": 100})
    sched = make(engine, max_batch_tokens=16)
    old = request("old")
    sched.add(old)
    FakeEngine.advance(sched.schedule())  # old prefilled: decoding from now on
    assert old.num_pending == 1
    sched.add(request("new"))
    items = sched.schedule()
    assert [(i.request.name, i.num_tokens) for i in items] == [("old", 1), ("new", 15)]
    assert items[0].samples and not items[1].samples


def test_token_budget_chunks_a_long_prefill_and_samples_only_on_the_last_chunk():
    engine = FakeEngine({"long": 40, "short": 5})
    sched = make(engine, max_batch_tokens=16)
    long_req, short_req = request("long"), request("short")
    sched.add(long_req)
    sched.add(short_req)
    steps = []
    for _ in range(4):
        items = sched.schedule()
        steps.append([(i.request.name, i.num_tokens, i.samples) for i in items])
        assert sum(i.num_tokens for i in items) <= 16
        FakeEngine.advance(items)
    assert steps[0] == [("long", 16, False)]  # oldest first gets the whole budget
    assert steps[1] == [("long", 16, False)]
    # long's last chunk (8) samples; short fills the rest of the budget and samples too.
    assert steps[2] == [("long", 8, True), ("short", 5, True)]
    assert steps[3] == [("long", 1, True), ("short", 1, True)]  # both decoding


def test_a_completing_request_writes_its_last_token_without_sampling():
    engine = FakeEngine({"a": 2})
    sched = make(engine)
    req = request("a")
    sched.add(req)
    FakeEngine.advance(sched.schedule())
    req.status = Status.COMPLETING  # done was sent; one more step writes the last token's KV
    items = sched.schedule()
    assert [(i.num_tokens, i.samples) for i in items] == [(1, False)]


def test_has_work_and_remove():
    sched = make(FakeEngine())
    assert not sched.has_work()
    req = request("a")
    sched.add(req)
    assert sched.has_work()
    sched.remove(req)
    assert not sched.has_work()
    sched.remove(req)  # removing twice is harmless
