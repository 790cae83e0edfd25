"""`python -m fakeapi` serves the echo handler and says where on stderr."""

from __future__ import annotations

import re
import signal
import sys

import anthropic
import anyio
import pytest
from anyio.streams.text import TextReceiveStream

pytestmark = pytest.mark.anyio


async def test_cli_serves_echo_and_stops_on_sigint() -> None:
    with anyio.fail_after(30):
        async with await anyio.open_process(
            [sys.executable, "-m", "fakeapi", "--port", "0", "--latency-ms", "1"],
        ) as process:
            assert process.stderr is not None
            announced = ""
            async for chunk in TextReceiveStream(process.stderr):
                announced += chunk
                if "\n" in announced:
                    break
            match = re.search(r"(http://127\.0\.0\.1:\d+)", announced)
            assert match, announced
            async with anthropic.AsyncAnthropic(
                base_url=match.group(1), api_key="t", max_retries=0
            ) as client:
                message = await client.messages.create(
                    model="claude-test",
                    max_tokens=16,
                    messages=[{"role": "user", "content": "cli"}],
                )
            assert message.content[0].type == "text" and message.content[0].text == "echo: cli"
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
