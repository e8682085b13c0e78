"""The fixes for garbage-collection stalls (services/runtime/patches/pauses.py), on BentoML's own classes."""

from __future__ import annotations

import asyncio

from services.runtime.patches import pauses


def scheduled_timeouts(loop) -> int:
    return sum(1 for h in loop._scheduled if not h.cancelled() and
               getattr(h._callback, "__name__", "") == "_set_timer_out")


async def answer(scope, receive, send, delay: float = 0.0):
    await asyncio.sleep(delay)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def run_requests(middleware, count: int) -> tuple[list[int], int]:
    async def main():
        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def receive():
            return {"type": "http.request", "body": b""}

        for _ in range(count):
            await middleware({"type": "http"}, receive, send)
        return statuses, scheduled_timeouts(asyncio.get_running_loop())

    return asyncio.run(main())


def test_bentomls_timeout_middleware_leaves_no_timer_behind_once_fixed():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    pauses.install_timeout_fix()
    statuses, left = run_requests(TimeoutMiddleware(answer, timeout=60), 200)
    assert statuses == [200] * 200 and left == 0  # unfixed, 200 timers would wait out their 60 s


def test_the_fixed_middleware_still_times_out():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    pauses.install_timeout_fix()

    async def slow(scope, receive, send):
        await answer(scope, receive, send, delay=5)

    statuses, left = run_requests(TimeoutMiddleware(slow, timeout=0.1), 1)
    assert statuses == [504] and left == 0


def test_a_served_worker_freezes_what_it_has_loaded(policy_server):
    assert "long-lived objects exempted from garbage collection (GC_FREEZE)" in policy_server.log()
