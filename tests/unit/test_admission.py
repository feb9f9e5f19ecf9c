"""The gateway's rules for many users: bans only for faults and decaying strikes, and a bounded
FIFO admission queue (pure objects over injected clocks)."""

import asyncio

import pytest

from gateway.admission import Admission
from gateway.bans import Bans
from shared.errors import CacheFull, Overloaded


def test_bans_double_on_repeat_expire_and_decay_after_successes():
    now = [0.0]
    bans = Bans(base_s=15, decay_after=10, clock=lambda: now[0])
    assert bans.ban("a") == 15 and bans.active() == {"a"}
    now[0] = 15.1
    assert bans.active() == set()
    assert bans.ban("a") == 30  # a repeat doubles
    now[0] = 100.0
    for _ in range(9):
        bans.succeeded("a")
    assert bans.strikes("a") == 2
    bans.succeeded("a")  # ten good steps forgive one strike
    assert bans.strikes("a") == 1
    for _ in range(10):
        bans.succeeded("a")
    assert bans.strikes("a") == 0
    assert bans.ban("a") == 15  # back to the base ban


class Room:
    """A pretend swarm with `free` sessions of room; attempts take one or raise CacheFull."""

    def __init__(self, free: int):
        self.free = free
        self.order: list[str] = []

    def attempt(self, name: str):
        async def run():
            if self.free <= 0:
                raise CacheFull("no room")
            self.free -= 1
            self.order.append(name)
            return name
        return run


def test_requests_wait_in_order_and_are_refused_when_the_queue_is_full():
    async def scenario():
        room = Room(free=1)
        admission = Admission(max_queue=2, timeout_s=10, retry_interval_s=10)
        assert await admission.admit(room.attempt("first")) == "first"
        second = asyncio.create_task(admission.admit(room.attempt("second")))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(admission.admit(room.attempt("third")))
        await asyncio.sleep(0.01)
        assert admission.waiting == 2
        with pytest.raises(Overloaded):  # the queue holds two
            await admission.admit(room.attempt("fourth"))
        preempted = asyncio.create_task(admission.admit(room.attempt("preempted"), front=True))
        await asyncio.sleep(0.01)  # a preempted generation goes first, even past a full queue
        for _ in range(3):
            room.free += 1
            admission.changed()  # a session closed
            await asyncio.sleep(0.01)
        await asyncio.gather(second, third, preempted)
        return room.order, admission

    order, admission = asyncio.run(scenario())
    assert order == ["first", "preempted", "second", "third"]
    assert admission.refused == 1 and admission.waiting == 0


def test_a_wait_longer_than_the_timeout_is_refused():
    async def scenario():
        admission = Admission(max_queue=4, timeout_s=0.2, retry_interval_s=0.05)
        with pytest.raises(Overloaded, match="within"):
            await admission.admit(Room(free=0).attempt("never"))
        return admission

    assert asyncio.run(scenario()).waiting == 0
