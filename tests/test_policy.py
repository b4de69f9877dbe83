"""The batching policy on made-up entries: no model, no threads, exact batches."""

import pytest

from esmc_server.config import BatchingConfig
from esmc_server.policy import (
    Batch,
    FairClock,
    PendingEntry,
    batch_cost,
    next_wakeup,
    select_batch,
)

pytestmark = pytest.mark.unit

WAIT = BatchingConfig(max_batch_tokens=100, max_batch_size=8, max_wait_ms=10.0)


def entries(*lengths, arrival=0.0, step=0.001, priority=0, first_key=0):
    return [
        PendingEntry(key=first_key + i, length=n, arrival=arrival + i * step, priority=priority)
        for i, n in enumerate(lengths)
    ]


def test_nothing_pending_gives_nothing():
    assert select_batch([], WAIT, now=5.0) is None
    assert next_wakeup([], WAIT, now=5.0) is None


def test_waits_until_the_oldest_entry_waited_max_wait():
    pending = entries(10, 20, arrival=1.0)  # arrivals 1.000 and 1.001
    assert select_batch(pending, WAIT, now=1.0095) is None
    assert next_wakeup(pending, WAIT, now=1.0095) == pytest.approx(1.010)
    assert select_batch(pending, WAIT, now=1.010) == Batch(keys=(0, 1), tokens=30)


def test_budget_cut_takes_the_fitting_prefix_at_once():
    pending = entries(40, 40, 30, 5)  # 40 + 40 fit in 100, + 30 would not
    assert select_batch(pending, WAIT, now=0.0) == Batch(keys=(0, 1), tokens=80)


def test_exactly_filled_budget_cuts_at_once():
    pending = entries(60, 40)
    assert select_batch(pending, WAIT, now=0.0) == Batch(keys=(0, 1), tokens=100)


def test_fifo_never_skips_a_long_entry_for_later_short_ones():
    pending = entries(50, 60, 10, 10)  # 60 does not fit after 50; the 10s must not jump it
    first = select_batch(pending, WAIT, now=0.0)
    assert first == Batch(keys=(0,), tokens=50)
    rest = [e for e in pending if e.key not in first.keys]
    assert select_batch(rest, WAIT, now=1.0) == Batch(keys=(1, 2, 3), tokens=80)


def test_size_cap_cuts_at_once():
    limits = BatchingConfig(max_batch_tokens=1000, max_batch_size=3, max_wait_ms=10.0)
    pending = entries(5, 5, 5, 5, 5)
    assert select_batch(pending, limits, now=0.0) == Batch(keys=(0, 1, 2), tokens=15)


def test_max_batch_size_one_switches_batching_off():
    limits = BatchingConfig(max_batch_tokens=1000, max_batch_size=1, max_wait_ms=10.0)
    pending = entries(5, 6, 7)
    served = []
    while pending:
        batch = select_batch(pending, limits, now=0.0)  # no waiting: the cap is always filled
        assert batch is not None and len(batch.keys) == 1
        served.append(batch.keys[0])
        pending = [e for e in pending if e.key != batch.keys[0]]
    assert served == [0, 1, 2]


def test_single_entry_over_the_budget_runs_alone_at_once():
    assert select_batch(entries(150), WAIT, now=0.0) == Batch(keys=(0,), tokens=150)
    pending = entries(150, 10)
    assert select_batch(pending, WAIT, now=0.0) == Batch(keys=(0,), tokens=150)


def test_oversize_entry_behind_others_waits_its_turn():
    pending = entries(10, 150, 10)
    assert select_batch(pending, WAIT, now=0.0) == Batch(keys=(0,), tokens=10)


def test_generation_steps_go_first_and_do_not_wait():
    new = entries(30, 35, arrival=0.0)  # older new work
    steps = entries(20, 20, arrival=5.0, priority=1, first_key=10)  # steps ready later
    pending = new + steps
    assert next_wakeup(pending, WAIT, now=5.0) == 5.0
    # steps first (priority), then FIFO new work within the budget: 20 + 20 + 30 fits, + 35 not
    assert select_batch(pending, WAIT, now=5.0) == Batch(keys=(10, 11, 0), tokens=70)


def test_fifo_by_arrival_not_by_key():
    pending = [
        PendingEntry(key=7, length=10, arrival=3.0),
        PendingEntry(key=1, length=10, arrival=2.0),
        PendingEntry(key=4, length=10, arrival=1.0),
    ]
    assert select_batch(pending, WAIT, now=10.0).keys == (4, 1, 7)


def test_every_entry_is_served_in_order_under_a_steady_stream():
    pending = entries(*([45] * 9))
    served = []
    now = 0.0
    while pending:
        batch = select_batch(pending, WAIT, now)
        served.extend(batch.keys)
        pending = [e for e in pending if e.key not in batch.keys]
        now += 1.0
    assert served == list(range(9))


def test_padded_counts_count_times_max_length_and_sorts_by_length():
    limits = BatchingConfig(max_batch_tokens=100, max_batch_size=8, max_wait_ms=10.0, packed=False)
    pending = entries(30, 10, 20, 25)  # 3 * 30 = 90 fits; 4 * 30 = 120 does not
    assert select_batch(pending, limits, now=0.0) == Batch(keys=(1, 2, 0), tokens=90)


def test_padded_budget_counts_the_padding_a_long_entry_adds():
    limits = BatchingConfig(max_batch_tokens=100, max_batch_size=8, max_wait_ms=10.0, packed=False)
    pending = entries(10, 10, 60)  # packed would be 80; padded is 3 * 60 = 180
    assert select_batch(pending, limits, now=0.0) == Batch(keys=(0, 1), tokens=20)


def test_packed_counts_the_sum_of_lengths():
    assert batch_cost([10, 20, 30], packed=True) == 60
    assert batch_cost([10, 20, 30], packed=False) == 90
    assert batch_cost([], packed=False) == 0


# -- fairness over callers (start-time fair queueing by tokens) ---------------------------------


class Simulation:
    """The pending set's use of the policy, without threads: tag on queueing, select, serve.
    Generations are re-queued (a new tag) after each forward they ride in, until done."""

    def __init__(self, limits):
        self.limits = limits
        self.clock = FairClock()
        self.queued: dict[int, PendingEntry] = {}
        self.steps_left: dict[int, int] = {}
        self.keys = iter(range(10**9))
        self.now = 0.0

    def add(self, caller, length, steps=0):
        key = next(self.keys)
        self._queue(key, caller, length, priority=0)
        if steps:
            self.steps_left[key] = steps
        return key

    def _queue(self, key, caller, length, priority):
        start = self.clock.tag(caller, length)
        self.queued[key] = PendingEntry(key, length, self.now, priority, caller, start)

    def forward(self):
        batch = select_batch(list(self.queued.values()), self.limits, now=self.now + 1.0)
        taken = [self.queued.pop(k) for k in batch.keys]
        self.clock.served([e.start for e in taken])
        self.now += 1.0
        for e in taken:
            left = self.steps_left.get(e.key, 0) - 1
            if left > 0:  # a generation's next step
                self.steps_left[e.key] = left
                self._queue(e.key, e.caller, e.length, priority=1)
        return batch

    def forwards_until_served(self, key, limit=10_000):
        for n in range(1, limit + 1):
            if key in self.forward().keys:
                return n
        raise AssertionError("never served")


def bound(longest, budget, callers):
    """The module docstring's bound for an entry whose caller had nothing else queued."""
    return -(-2 * longest * (callers - 1) // (budget - longest)) + 1


FAIR = BatchingConfig(max_batch_tokens=1000, max_batch_size=256, max_wait_ms=0.0)


def test_fair_clock_tags_each_caller_after_its_own_work():
    clock = FairClock()
    assert [clock.tag("a", 10) for _ in range(3)] == [0.0, 10.0, 20.0]
    assert clock.tag("b", 5) == 0.0  # a newcomer starts at the virtual time, not behind "a"
    clock.served([10.0])
    assert clock.vtime == 10.0
    assert clock.tag("b", 5) == 10.0  # "b"'s last tag (5) fell behind: it starts again at 10
    assert clock.tag("c", 1) == 10.0


def test_a_thousand_queued_requests_do_not_delay_another_callers_one():
    sim = Simulation(FAIR)
    for _ in range(1000):
        sim.add("attacker", 100)
    sim.forward()
    victim = sim.add("victim", 10)
    waited = sim.forwards_until_served(victim)
    assert waited <= bound(100, 1000, 2)
    assert waited == 1  # its tag equals the virtual time: it rides in the next forward


def test_forty_long_generations_do_not_starve_small_requests():
    sim = Simulation(FAIR)
    for _ in range(40):
        sim.add("generator", 200, steps=1000)  # 40 x 200 tokens: 8 forwards per round of steps
    for _ in range(5):
        sim.forward()
    waits = []
    for _ in range(20):
        victim = sim.add("victim", 30)
        waits.append(sim.forwards_until_served(victim))
    assert max(waits) <= bound(200, 1000, 2)
    # and the generations are not starved either: every one of them stepped meanwhile
    assert all(left < 1000 for left in sim.steps_left.values())


def test_entries_over_the_budget_run_alone_and_are_charged_to_their_caller():
    sim = Simulation(FAIR)
    for _ in range(50):
        sim.add("attacker", 5000)  # each over the 1000-token budget: one forward each
    first = sim.forward()
    assert len(first.keys) == 1 and first.tokens == 5000
    victim = sim.add("victim", 10)
    assert sim.forwards_until_served(victim) <= 2 * (2 - 1) + 1


def test_bound_holds_with_many_callers_and_mixed_lengths():
    sim = Simulation(FAIR)
    lengths = [17, 230, 64, 400, 12]
    for i in range(300):
        sim.add(f"c{i % 5}", lengths[i % 5], steps=(3 if i % 7 == 0 else 0))
    for _ in range(3):
        sim.forward()
    victim = sim.add("victim", 50)
    assert sim.forwards_until_served(victim) <= bound(400, 1000, 6)


def test_one_caller_alone_keeps_fifo_order():
    sim = Simulation(FAIR)
    keys = [sim.add("only", n) for n in (600, 300, 300, 50)]
    assert sim.forward().keys == (keys[0], keys[1])
    assert sim.forward().keys == (keys[2], keys[3])
