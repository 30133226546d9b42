"""s3cache.singleflight: one piece of work per key, shared by who asks meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from s3cache.singleflight import SingleFlight


def test_concurrent_callers_of_a_key_share_one_run_and_other_keys_run_apart() -> None:
    async def main() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        runs: list[str] = []
        release = asyncio.Event()

        async def work(key: str) -> int:
            runs.append(key)
            await release.wait()
            return len(runs)

        calls = [asyncio.create_task(flights.run(k, lambda k=k: work(k), -1)) for k in "aab"]
        await asyncio.sleep(0)
        assert "a" in flights and len(flights) == 2
        release.set()
        assert await asyncio.gather(*calls) == [2, 2, 2]
        assert sorted(runs) == ["a", "b"]
        assert "a" not in flights  # free again: the next call runs anew
        assert await flights.run("a", lambda: work("a"), -1) == 3

    asyncio.run(main())


def test_a_leader_that_fails_gives_its_joiners_the_failed_value() -> None:
    async def main() -> None:
        flights: SingleFlight[str, int | None] = SingleFlight()
        started = asyncio.Event()

        async def broken() -> int:
            started.set()
            await asyncio.sleep(0.01)
            raise OSError("no")

        leader = asyncio.create_task(flights.run("k", broken, None))
        await started.wait()
        joiner = asyncio.create_task(flights.run("k", broken, None))
        with pytest.raises(OSError):
            await leader
        assert await joiner is None

    asyncio.run(main())


def test_a_published_value_reaches_joiners_while_the_leader_keeps_its_own() -> None:
    async def main() -> None:
        flights: SingleFlight[str, str | None] = SingleFlight()
        go = asyncio.Event()

        async def lead() -> str:
            with flights.lead("k", None) as publish:
                await go.wait()
                publish("shared")
                return "the leader's own"

        leader = asyncio.create_task(lead())
        await asyncio.sleep(0)
        joined = flights.joined("k")
        assert joined is not None and flights.joined("other") is None
        go.set()
        assert await leader == "the leader's own"
        assert await joined == "shared"

    asyncio.run(main())


def test_shared_work_survives_its_first_callers_cancellation() -> None:
    async def main() -> None:
        flights: SingleFlight[str, int] = SingleFlight()
        runs = 0
        release = asyncio.Event()

        async def work() -> int:
            nonlocal runs
            runs += 1
            await release.wait()
            return 7

        first = asyncio.create_task(flights.shared("k", work))
        await asyncio.sleep(0)
        second = asyncio.create_task(flights.shared("k", work))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await second == 7
        assert first.cancelled() and runs == 1

        async def broken() -> int:
            raise ValueError("every caller sees it")

        with pytest.raises(ValueError):
            await flights.shared("k", broken)

    asyncio.run(main())
