"""Redis AUTH (password, ACL user) and TLS against a real redis-server 7 built with TLS,
and credentials kept out of reprs, errors and logs."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from features import (
    USER_FEATURES,
    FeatureStore,
    FeatureWriteError,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    open_redis,
    redact_url,
)
from tests.certs import CertFiles, TestCA
from tools.redis_server import RedisServer, find_tls_binary, free_port

PASSWORD = "pw-Default-7d1e"
WRONG_PASSWORD = "wrong-password-1f2e"
READER, READER_PASSWORD = "scorer", "pw-Reader-93af"


@dataclass(frozen=True)
class TLSRedis:
    server: RedisServer
    tls_port: int
    ca: CertFiles
    client: CertFiles
    other_ca: CertFiles

    def url(self, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"rediss://{at}127.0.0.1:{self.tls_port}/0"

    def settings(self, url: str | None = None, **overrides: object) -> Settings:
        options: dict[str, object] = {
            "redis_url": url or self.url(),
            "redis_tls_ca_file": str(self.ca.cert),
            "redis_tls_cert_file": str(self.client.cert),
            "redis_tls_key_file": str(self.client.key),
            "redis_socket_timeout_s": 1.0,
            "redis_connect_timeout_s": 1.0,
        }
        return Settings(**(options | overrides))  # type: ignore[arg-type]

    def refused(self, refusal: str) -> Settings:
        """Settings the server refuses, in the way REFUSALS names."""
        return self.settings(None, **REFUSALS[refusal][0](self))


def _plaintext(tls: TLSRedis) -> dict[str, object]:
    no_tls: dict[str, object] = {
        "redis_tls_ca_file": "",
        "redis_tls_cert_file": "",
        "redis_tls_key_file": "",
    }
    return {"redis_password": PASSWORD, "redis_url": f"redis://127.0.0.1:{tls.tls_port}/0"} | no_tls


REFUSALS: dict[str, tuple[Callable[[TLSRedis], dict[str, object]], str]] = {
    # What each refusal changes in TLSRedis.settings, and the pattern of its logged cause.
    "wrong-password": (lambda tls: {"redis_password": WRONG_PASSWORD}, "AuthenticationError"),
    "wrong-ca": (
        lambda tls: {"redis_password": PASSWORD, "redis_tls_ca_file": str(tls.other_ca.cert)},
        "CERTIFICATE_VERIFY_FAILED",
    ),
    "no-client-cert": (
        lambda tls: {
            "redis_password": PASSWORD,
            "redis_tls_cert_file": "",
            "redis_tls_key_file": "",
        },
        # TLS 1.3: the server checks the client after the handshake, so the client sees
        # its alert or, if the close wins the race, a reset.
        "CERTIFICATE_REQUIRED|Connection reset",
    ),
    "plaintext-to-tls-port": (_plaintext, "ConnectionError"),
}
SECRETS = (PASSWORD, WRONG_PASSWORD)  # never in a log line or a repr


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    directory = tmp_path_factory.mktemp("tls")
    ca = TestCA(directory)
    server_cert, client_cert = ca.issue("server"), ca.issue("client")
    other_ca = TestCA(directory, "other-ca").files
    tls_port = free_port()
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(server_cert.cert),
        "--tls-key-file", str(server_cert.key),
        "--tls-ca-cert-file", str(ca.files.cert),
        "--tls-auth-clients", "yes",
        "--requirepass", PASSWORD,
    ]  # fmt: skip
    with RedisServer(extra_args=args, quiet=True, binary=find_tls_binary()) as server:
        admin = redis.Redis(port=server.port, password=PASSWORD)
        assert admin.info("server")["redis_version"].startswith("7.")
        # A read-only ACL user: the read path's commands on feature keys, nothing else.
        admin.acl_setuser(
            READER,
            enabled=True,
            passwords=[f"+{READER_PASSWORD}"],
            keys=["user:*", "merchant:*"],
            commands=["-@all", "+hmget", "+get", "+zcard", "+zcount", "+zscore", "+ping"],
        )
        admin.hset("user:{u1}:features", mapping={"tx_count_1h": 7, "tx_sum_1h": 12.5})
        admin.close()
        yield TLSRedis(server, tls_port, ca.files, client_cert, other_ca)


async def read_user(settings: Settings) -> tuple[Source, Reason | None, float]:
    client = open_redis(settings)
    try:
        rows = await FeatureStore(client).read([{"user": "u1", "merchant": "m1"}])
    finally:
        await client.aclose()
    read = rows.reads[0]["user:features"]
    return read.source, read.reason, float(rows.values[0, 0])


async def test_tls_with_ca_file_client_cert_and_password(tls_redis: TLSRedis) -> None:
    settings = tls_redis.settings(redis_password=PASSWORD)
    assert await read_user(settings) == (Source.REDIS, Reason.INVALID, 7.0)


async def test_acl_user_in_the_url_may_read_but_not_write(tls_redis: TLSRedis) -> None:
    settings = tls_redis.settings(tls_redis.url(f"{READER}:{READER_PASSWORD}"))
    assert (await read_user(settings))[:2] == (Source.REDIS, Reason.INVALID)
    client = open_redis(settings)
    try:
        with pytest.raises(FeatureWriteError, match=r"NOPERM|no permissions") as info:
            await FeatureWriter(client).write(USER_FEATURES, [("u2", {"tx_count_1h": 1})])
    finally:
        await client.aclose()
    assert READER_PASSWORD not in str(info.value)


async def test_acl_user_from_settings(tls_redis: TLSRedis) -> None:
    settings = tls_redis.settings(redis_username=READER, redis_password=READER_PASSWORD)
    assert (await read_user(settings))[:2] == (Source.REDIS, Reason.INVALID)
    client = open_redis(settings)
    try:
        rows = await FeatureStore(client).read([{"user": "u1", "merchant": "m1"}])
    finally:
        await client.aclose()
    # The sorted-set and embedding reads are allowed too: absent, not refused (invalid).
    for group in ("user:activity", "user:merchants", "merchant:embedding"):
        assert rows.reads[0][group].reason is Reason.MISSING, group


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_refused_connections_serve_defaults_and_leak_no_secret(
    tls_redis: TLSRedis, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls_redis.refused(refusal)
    with caplog.at_level(logging.WARNING, logger="features.online.redis_tier"):
        source, reason, _ = await read_user(settings)
    assert (source, reason) == (Source.DEFAULT, Reason.UNAVAILABLE)
    assert "Redis read failed" in caplog.text and re.search(REFUSALS[refusal][1], caplog.text)
    for secret in SECRETS:
        assert secret not in caplog.text
        assert secret not in repr(settings)


def test_settings_hide_passwords_and_check_tls_options(tmp_path: Path) -> None:
    settings = Settings(redis_url="rediss://bob:hunter2@10.0.0.1:6380/0?password=hunter3")
    assert "hunter" not in repr(settings) and "bob:***@10.0.0.1:6380" in repr(settings)
    assert "hunter" not in repr(Settings(redis_password="hunter2"))
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(ValueError, match=r"REDIS_TLS_\* files need a rediss://"):
        Settings(redis_url="redis://h:1/0", redis_tls_ca_file="ca.pem")
    with pytest.raises(ValueError, match="CERT_FILE and _KEY_FILE"):
        Settings(redis_url="rediss://h:1/0", redis_tls_cert_file="c.pem")
    with pytest.raises(ValueError, match="a password is in"):
        Settings(redis_url="redis://:a@h:1/0", redis_password="b")
    with pytest.raises(ValueError, match="REDIS_URL must start with"):
        Settings(redis_url="http://h:1/0")
    env = {"FEATURES_REDIS_URL": "rediss://h:1/0", "FEATURES_REDIS_TLS_CA_FILE": "/ca.pem"}
    assert Settings.from_env(env).redis_tls_ca_file == "/ca.pem"
