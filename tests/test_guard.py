"""The guard: a test cannot reach the real model API."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import GUARD_BASE_URL, RealNetworkBlocked


def test_non_loopback_connect_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(RealNetworkBlocked):
        s.connect(("160.79.104.10", 443))


def test_default_client_points_at_closed_loopback_port() -> None:
    assert os.environ["ANTHROPIC_BASE_URL"] == GUARD_BASE_URL
    assert os.environ["ANTHROPIC_API_KEY"].startswith("sk-test-guard")


@pytest.mark.anyio
async def test_real_anthropic_client_fails_loudly_without_a_fake() -> None:
    import anthropic

    client = anthropic.AsyncAnthropic(max_retries=0, timeout=5)
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(
            model="claude-sonnet-5-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
        )
    await client.close()
