"""The batching queue on its own, with a fake predictor."""

import asyncio
import threading
import time

import pytest

from app.errors import DeadlineExceededError, QueueFullError, UnavailableError
from tests.app.fakes import FakePredictor, run, solid_image, started, submit, until


def test_images_of_concurrent_requests_share_batches():
    predictor = FakePredictor()

    async def scenario():
        batcher = await started(predictor)
        requests = [submit(batcher, [solid_image(v)]) for v in range(8)]
        results = await asyncio.gather(*requests)
        await batcher.stop()
        return results

    results = run(scenario())
    assert [r[0].result.detections[0].score for r in results] == [
        pytest.approx(v / 255) for v in range(8)
    ]
    assert sorted(len(b) for b in predictor.batches) == [4, 4]


def test_one_request_results_keep_order_and_timings():
    predictor = FakePredictor(forward_s=0.01)

    async def scenario():
        batcher = await started(predictor, max_batch_size=2)
        results = await submit(batcher, [solid_image(v) for v in (10, 20, 30)])
        await batcher.stop()
        return results

    results = run(scenario())
    assert [r.result.detections[0].score for r in results] == [
        pytest.approx(v / 255) for v in (10, 20, 30)
    ]
    assert all(r.inference_s >= 0.01 and r.queue_s >= 0 for r in results)


def test_a_lone_image_waits_at_most_the_batch_delay():
    predictor = FakePredictor()

    async def scenario():
        batcher = await started(predictor, max_batch_delay_s=0.05)
        start = time.monotonic()
        await submit(batcher, [solid_image(1)])
        elapsed = time.monotonic() - start
        await batcher.stop()
        return elapsed

    assert 0.04 <= run(scenario()) < 1.0
    assert predictor.batches == [[pytest.approx(1 / 255)]]


def test_images_of_different_sizes_are_not_batched_together():
    predictor = FakePredictor()

    async def scenario():
        batcher = await started(predictor, max_batch_size=8)
        small = [solid_image(v, 32, 32) for v in (1, 2, 3)]
        large = [solid_image(v, 64, 48) for v in (101, 102)]
        await asyncio.gather(
            submit(batcher, small[:2] + large[:1]), submit(batcher, [small[2], large[1]])
        )
        await batcher.stop()

    run(scenario())
    groups = sorted(sorted(round(s * 255) for s in batch) for batch in predictor.batches)
    assert groups == [[1, 2, 3], [101, 102]]


def test_full_queue_refuses_with_retry_after_before_any_work():
    predictor = FakePredictor()
    predictor.gate = threading.Event()

    async def scenario():
        batcher = await started(predictor, max_batch_size=2, max_queue_size=4)
        first = asyncio.create_task(submit(batcher, [solid_image(1), solid_image(2)]))
        await until(lambda: predictor.forwards_started == 1, "the first in a (held) forward")
        queued = asyncio.create_task(submit(batcher, [solid_image(v) for v in (3, 4, 5, 6)]))
        await until(lambda: batcher.depth == 4, "four images queued")
        with pytest.raises(QueueFullError) as refused:
            batcher.admit(1)
        assert batcher.depth == 4
        predictor.gate.set()
        await asyncio.gather(first, queued)
        await batcher.stop()
        return refused.value

    error = run(scenario())
    assert error.status_code == 503 and int(error.headers["Retry-After"]) >= 1
    assert predictor.images_forwarded == 6


def test_expired_and_withdrawn_images_never_reach_the_model():
    predictor = FakePredictor()
    predictor.gate = threading.Event()

    async def scenario():
        batcher = await started(predictor, max_batch_size=1)
        blocker = asyncio.create_task(submit(batcher, [solid_image(1)]))
        await until(lambda: predictor.forwards_started == 1, "the first in a (held) forward")
        expiring = asyncio.create_task(submit(batcher, [solid_image(2)], timeout=0.1))
        leaving = asyncio.create_task(submit(batcher, [solid_image(3)]))
        await until(lambda: batcher.depth == 2, "both queued")
        expired = time.monotonic() + 0.1  # the second's deadline was set before this
        leaving.cancel()  # the client went away
        await until(lambda: time.monotonic() > expired, "the second's deadline to pass")
        predictor.gate.set()
        await blocker
        with pytest.raises(DeadlineExceededError):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await batcher.stop()
        return batcher

    batcher = run(scenario())
    assert predictor.batches == [[pytest.approx(1 / 255)]]
    dropped = batcher.metrics.dropped_images
    assert dropped.labels(reason="cancelled")._value.get() == 1
    assert dropped.labels(reason="deadline")._value.get() == 1


def test_out_of_memory_splits_the_batch_and_fails_only_what_cannot_run_alone():
    # batches of more than 2 run out of memory; the image of value 9 always does
    predictor = FakePredictor(
        oom_if=lambda images: len(images) > 2 or any(int(i[0, 0, 0]) == 9 for i in images)
    )

    async def scenario():
        batcher = await started(predictor, max_batch_size=4)
        ok = submit(batcher, [solid_image(v) for v in (1, 2, 3)])
        doomed = submit(batcher, [solid_image(9)])
        results = await asyncio.gather(ok, doomed, return_exceptions=True)
        await batcher.stop()
        return results

    ok, doomed = run(scenario())
    assert [r.result.detections[0].score for r in ok] == [pytest.approx(v / 255) for v in (1, 2, 3)]
    assert isinstance(doomed, UnavailableError) and doomed.code == "out_of_memory"
    assert all(len(batch) <= 2 for batch in predictor.batches)


def test_next_forward_overlaps_previous_postprocessing():
    predictor = FakePredictor(forward_s=0.1, finish_s=0.3)

    async def scenario():
        batcher = await started(predictor, max_batch_size=2)
        await asyncio.gather(*(submit(batcher, [solid_image(v)]) for v in range(4)))
        await batcher.stop()

    run(scenario())
    times = {(stage, n): t for stage, n, t in predictor.events}
    assert times[("forward_start", 1)] < times[("finish_end", 0)]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_forwards_run_at_once_up_to_the_concurrency(concurrency):
    """A pool of model processes forwards one batch per child at once; a lone
    predictor never two."""
    predictor = FakePredictor(forward_s=0.2)

    async def scenario():
        batcher = await started(
            predictor, max_batch_size=1, max_batch_delay_s=0, concurrency=concurrency
        )
        results = await asyncio.gather(*(submit(batcher, [solid_image(v)]) for v in range(6)))
        await batcher.stop()
        return results

    results = run(scenario())
    assert [r[0].result.detections[0].score for r in results] == [
        pytest.approx(v / 255) for v in range(6)
    ]
    assert most_at_once(predictor.events, "forward") == concurrency


def most_at_once(events: list[tuple[str, int, float]], stage: str) -> int:
    """The most ``stage`` calls running at one time, from ``FakePredictor.events``."""
    steps = sorted(
        (t, 1 if kind.endswith("start") else -1) for kind, _, t in events if kind.startswith(stage)
    )
    running = most = 0
    for _, step in steps:
        running += step
        most = max(most, running)
    return most


def test_predictor_errors_fail_their_batch_and_the_queue_goes_on():
    predictor = FakePredictor(fail_with=RuntimeError("boom"))

    async def scenario():
        batcher = await started(predictor)
        with pytest.raises(RuntimeError, match="boom"):
            await submit(batcher, [solid_image(1)])
        predictor.fail_with = None
        result = await submit(batcher, [solid_image(2)])
        await batcher.stop()
        return result

    assert run(scenario())[0].result.detections[0].score == pytest.approx(2 / 255)


def test_stop_finishes_queued_work():
    predictor = FakePredictor(forward_s=0.05)

    async def scenario():
        batcher = await started(predictor, max_batch_size=1)
        tasks = [asyncio.create_task(submit(batcher, [solid_image(v)])) for v in range(3)]
        await until(lambda: batcher.depth + predictor.forwards_started == 3, "all admitted")
        await batcher.stop(drain=True)
        return await asyncio.gather(*tasks)

    assert len(run(scenario())) == 3
    assert predictor.images_forwarded == 3
