"""A tool call with a resolver (`roots`) does not rebuild a pydantic class each time."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from mcp.server.mcpserver import AcceptedElicitation

import mcp_server.server


def test_the_accepted_resolver_class_outlives_a_collection() -> None:
    # Pydantic caches `AcceptedElicitation[Any]` weakly: without the server's reference the class
    # is collected and the next tool call with a resolver builds it again (~0.5 ms).
    assert mcp_server.server.ACCEPTED_ANY is AcceptedElicitation[Any]
    ref = weakref.ref(AcceptedElicitation[Any])
    gc.collect()
    assert ref() is not None
    assert AcceptedElicitation[Any] is ref()
