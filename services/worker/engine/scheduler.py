"""Which requests run in the next step, and how many of their tokens (no torch here).

Policy: FIFO admission while there are free slots (`max_batch_size`), skipping a request whose
sequence is busy with an earlier request (it waits for that one and continues after it;
stateless requests have no sequence to wait for) or whose KV is still being read from a tier. Each step has a token budget
(`max_batch_tokens`): every decoding request gets its one token first, so running generations
never stall; the rest of the budget goes to prompt prefill in chunks, oldest first. A long
prompt therefore takes several steps, each shared with the decodes.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from services.worker.engine.sequence import Request, Status


class Admission(Enum):
    ADMITTED = auto()
    REJECTED = auto()  # the engine already told the request why
    NO_ROOM = auto()   # KV budget full for now; retry when running requests finish
    DEFER = auto()     # waits for another request (an n > 1 sibling's prompt); others may go first


@dataclass(frozen=True)
class ScheduledItem:
    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.request.wants_sample and self.num_tokens == self.request.num_pending


class Scheduler:
    def __init__(self, admit: Callable[[Request], Admission], max_batch_size: int, max_batch_tokens: int):
        self.admit = admit
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> list[ScheduledItem]:
        self._admit_waiting()
        budget = self.max_batch_tokens
        items = []
        for req in sorted(self.running, key=lambda r: r.num_pending != 1):  # decodes first
            n = min(req.num_pending, budget)
            if n <= 0:
                continue
            items.append(ScheduledItem(req, n))
            budget -= n
        return items

    def _admit_waiting(self) -> None:
        busy = {r.seq_id for r in self.running}
        skipped = 0
        for req in list(self.waiting):
            if len(self.running) >= self.max_batch_size:
                return
            if req.loading or (not req.stateless and req.seq_id in busy):
                skipped += 1  # its KV is still being read from a tier, or its sequence is busy
                continue
            # Dequeued before admit: a request told it is rejected no longer counts as waiting.
            self.waiting.remove(req)
            result = self.admit(req)
            if result is Admission.NO_ROOM:
                self.waiting.insert(skipped, req)  # back in place: nobody overtakes it for memory
                return
            if result is Admission.DEFER:
                self.waiting.insert(skipped, req)
                skipped += 1
                continue
            if result is Admission.ADMITTED:
                req.status = Status.RUNNING
                self.running.append(req)
                if not req.stateless:
                    busy.add(req.seq_id)
