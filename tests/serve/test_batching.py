"""The Batcher on its own: what merges, what waits, what is refused, what survives errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from imgtriage.serve.batching import Batcher, QueueFull


class Recorder:
    """An infer function that records each batch and can be held at a gate."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[tuple[list[str], object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, items, names, key):
        self.batches.append((list(names), key))
        if not self.gate.wait(10):
            raise RuntimeError("gate never opened")
        if self.fail_on in names:
            raise ValueError(f"bad batch with {self.fail_on}")
        return [{"name": n, "len": len(x), "key": key} for x, n in zip(items, names,
                                                                       strict=True)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(infer, **kw) -> Batcher:
    b = Batcher(infer, **kw)
    b.start()
    return b


def test_concurrent_jobs_merge_and_each_gets_its_own_rows():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=0.05)
        jobs = [b.submit([b"x" * i] * 2, [f"j{i}a", f"j{i}b"], "k") for i in range(1, 5)]
        out = await asyncio.gather(*jobs)
        await b.stop()
        return out

    out = run(main())
    assert len(rec.batches) == 1 and len(rec.batches[0][0]) == 8
    for i, rows in enumerate(out, 1):
        assert [r["name"] for r in rows] == [f"j{i}a", f"j{i}b"]
        assert all(r["len"] == i for r in rows)


def test_a_full_batch_goes_without_waiting_for_max_wait():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=4, max_wait_s=60.0)  # a wait would time the test out
        with b.receiving():  # another request is on its way, but the batch is already full
            out = await asyncio.gather(*(b.submit([b"x"], [f"n{i}"], "k") for i in range(4)))
        await b.stop()
        return out

    assert len(run(main())) == 4 and [len(n) for n, _ in rec.batches] == [4]


def test_a_lone_request_never_waits():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=60.0)
        rows = [await b.submit([b"x"], [f"r{i}"], "k") for i in range(3)]
        await b.stop()
        return rows

    assert len(run(main())) == 3 and [len(n) for n, _ in rec.batches] == [1, 1, 1]


def test_a_batch_waits_for_a_request_still_being_received():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=60.0)
        with b.receiving():
            first = asyncio.ensure_future(b.submit([b"x"], ["first"], "k"))
            await asyncio.sleep(0.05)
            assert rec.batches == []  # held back: the other request is still arriving
            second = b.enqueue([b"x"], ["second"], "k")
        await asyncio.gather(first, second)  # received: both go at once, without the 60 s
        await b.stop()

    run(main())
    assert [names for names, _ in rec.batches] == [["first", "second"]]


async def queued_behind_a_running_batch(b: Batcher, rec: Recorder, key: str = "k",
                                        first: str = "x1"):
    """``first`` runs (held at the gate) while y1 and z1 queue with ``key``; then ``first``
    is answered."""
    x1 = asyncio.ensure_future(b.submit([b"x"], [first], "k"))
    while not any(first in names for names, _ in rec.batches):
        await asyncio.sleep(0.005)
    queued = [asyncio.ensure_future(b.submit([b"x"], [n], key)) for n in ("y1", "z1")]
    await asyncio.sleep(0.01)
    rec.gate.set()
    await x1
    return queued


def test_the_clients_a_batch_answered_are_waited_for():
    """A closed-loop client sends again when answered: the queued jobs wait to go with it,
    so concurrent clients share one batch instead of alternating in smaller ones."""
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=60.0)
        queued = await queued_behind_a_running_batch(b, rec)
        await asyncio.sleep(0.05)
        assert len(rec.batches) == 1  # y1 and z1 are held for x1's client
        await asyncio.gather(b.submit([b"x"], ["x2"], "k"), *queued)
        await b.stop()

    run(main())
    assert [names for names, _ in rec.batches] == [["x1"], ["y1", "z1", "x2"]]


def test_a_client_that_does_not_come_back_costs_at_most_max_wait():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=0.05)
        await asyncio.gather(*await queued_behind_a_running_batch(b, rec))
        await b.stop()

    run(main())
    assert [names for names, _ in rec.batches] == [["x1"], ["y1", "z1"]]


def test_clients_that_do_not_come_back_stop_being_waited_for():
    """Independent users: nobody sends again soon after a batch. After a few such batches a
    request queued behind a running one no longer waits for the client it answered."""
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=0.02)

        async def one_round(i: int) -> None:
            rec.gate.clear()
            queued = await queued_behind_a_running_batch(b, rec, first=f"x{i}")
            await asyncio.gather(*queued)
            await asyncio.sleep(0.06)  # nothing arrives within the window after the batches

        for i in range(3):
            await one_round(i)
        b.max_wait_s = 60.0  # a wait for the answered client would now time the test out
        await one_round(3)
        await b.stop()

    run(main())
    assert [names for names, _ in rec.batches][-2:] == [["x3"], ["y1", "z1"]]


def test_the_return_tracker_stays_bounded_when_batches_are_always_full():
    """Full batches never ask whether the answered clients come back; what the tracker keeps
    must still be trimmed at every batch, or a busy server would grow without end."""
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=2, max_wait_s=0.0, max_queue=1000)
        await asyncio.gather(*(b.submit([b"x"] * 2, [f"r{i}"] * 2, "k") for i in range(300)))
        kept = len(b._returns._open) + len(b._returns._arrivals)
        await b.stop()
        return kept

    assert run(main()) <= 4 and len(rec.batches) == 300


def test_jobs_with_other_options_do_not_wait_for_the_answered_clients():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=60.0)  # a wait would time out
        await asyncio.gather(*await queued_behind_a_running_batch(b, rec, key="probs"))
        await b.stop()

    run(main())
    assert [names for names, _ in rec.batches] == [["x1"], ["y1", "z1"]]


def test_batches_never_exceed_max_batch_and_keep_arrival_order():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=3, max_wait_s=0.01)
        await asyncio.gather(*(b.submit([b"x"] * n, [f"r{i}"] * n, "k")
                               for i, n in enumerate([2, 2, 1, 3, 1])))
        await b.stop()

    run(main())
    sizes = [len(n) for n, _ in rec.batches]
    assert all(s <= 3 for s in sizes) and sum(sizes) == 9
    order = [name for names, _ in rec.batches for name in dict.fromkeys(names)]
    assert order == ["r0", "r1", "r2", "r3", "r4"]


def test_a_job_larger_than_max_batch_runs_alone():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=2, max_wait_s=0.0, max_queue=1000)
        rows = await b.submit([b"x"] * 5, list("abcde"), "k")
        await b.stop()
        return rows

    assert len(run(main())) == 5 and [len(n) for n, _ in rec.batches] == [5]


def test_different_options_never_share_a_batch():
    rec = Recorder()

    async def main():
        b = await started(rec, max_batch=16, max_wait_s=0.02)
        out = await asyncio.gather(b.submit([b"x"], ["a"], "probs"),
                                   b.submit([b"x"], ["b"], "plain"),
                                   b.submit([b"x"], ["c"], "probs"))
        await b.stop()
        return out

    out = run(main())
    assert sorted((tuple(n), k) for n, k in rec.batches) == [(("a", "c"), "probs"),
                                                             (("b",), "plain")]
    assert [rows[0]["key"] for rows in out] == ["probs", "plain", "probs"]


def test_queue_is_bounded_in_images_and_frees_up():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = await started(rec, max_batch=1, max_wait_s=0.0, max_queue=3)
        first = asyncio.ensure_future(b.submit([b"x"], ["running"], "k"))
        while not rec.batches:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(b.submit([b"x"] * 3, ["q"] * 3, "k"))
        await asyncio.sleep(0.01)
        assert b.depth == 3
        with pytest.raises(QueueFull) as err:
            await b.submit([b"x"], ["refused"], "k")
        assert err.value.retry_after >= 1 and err.value.capacity == 3
        rec.gate.set()
        await asyncio.gather(first, queued)
        assert b.depth == 0
        rows = await b.submit([b"x"], ["after"], "k")
        await b.stop()
        return rows

    assert run(main())[0]["name"] == "after"


def test_an_inference_error_reaches_its_jobs_and_the_batcher_goes_on():
    rec = Recorder(fail_on="boom")

    async def main():
        b = await started(rec, max_batch=8, max_wait_s=0.02)
        res = await asyncio.gather(b.submit([b"x"], ["ok1"], "k"), b.submit([b"x"], ["boom"],
                                                                             "k"),
                                   return_exceptions=True)
        after = await b.submit([b"x"], ["ok2"], "k")
        await b.stop()
        return res, after

    res, after = run(main())
    assert all(isinstance(r, ValueError) for r in res)  # they shared the failing batch
    assert after[0]["name"] == "ok2"


def test_a_cancelled_job_is_dropped_before_inference():
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = await started(rec, max_batch=1, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([b"x"], ["first"], "k"))
        while not rec.batches:
            await asyncio.sleep(0.005)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit([b"x"], ["gave-up"], "k"), 0.05)
        rec.gate.set()
        await first
        rows = await b.submit([b"x"], ["next"], "k")
        await b.stop()
        return rows

    assert run(main())[0]["name"] == "next"
    assert [n for names, _ in rec.batches for n in names] == ["first", "next"]


def test_submit_before_start_is_an_error():
    rec = Recorder()

    async def main():
        b = Batcher(rec)
        with pytest.raises(RuntimeError, match="start"):
            await b.submit([b"x"], ["a"], "k")

    run(main())
