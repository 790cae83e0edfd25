"""`python -m fakeapi --port 8123 [--latency-ms N] [--fault-rate P --seed S]`: the echo handler."""

from __future__ import annotations

import argparse
import contextlib
import sys

import anyio

from fakeapi.faults import FaultPlan
from fakeapi.server import FakeAnthropic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fakeapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="probability in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fake = FakeAnthropic(
        latency_s=args.latency_ms / 1000,
        faults=FaultPlan(rate=args.fault_rate, seed=args.seed),
        host=args.host,
        port=args.port,
    )

    async def serve() -> None:
        async with fake.serve():
            print(f"fakeapi serving at {fake.base_url}", file=sys.stderr, flush=True)
            await anyio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve)


if __name__ == "__main__":
    main()
