"""Lua scripts run by SHA in a pipeline, sent whole only to a server that lacks them.

redis-py's own Script objects cannot serve here: a cluster pipeline refuses EVALSHA, and
a standalone one asks SCRIPT EXISTS before every batch. Instead each call goes out as
EVALSHA; the calls a server answers NOSCRIPT (after a restart, a failover or SCRIPT
FLUSH: the script did not run) go out once more as EVAL, which also caches the script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from features.connection import Client

Call = tuple[str | tuple[str, ...], Sequence[Any]]
"""(the script's key, or its keys (all in one cluster slot), its arguments)"""


class Script:
    """A Lua script on one key (or a few in one slot), hashed once; `run` sends it by SHA."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: Client, calls: Sequence[Call]) -> list[Any]:
        """Run the script once per call in one non-transactional pipeline; replies in
        call order, a command's error as its reply. Raises what the pipeline raises."""
        replies = await _pipeline(client, "EVALSHA", self.sha, calls)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            again = await _pipeline(client, "EVAL", self.source, [calls[i] for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        return replies


async def _pipeline(client: Client, command: str, script: str, calls: Sequence[Call]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for key, args in calls:
            keys = (key,) if isinstance(key, str) else key
            pipe.execute_command(command, script, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies
