"""The `bentoml serve` launcher stops the arbiter and every worker, with or without grace."""

from __future__ import annotations

from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tools.bento_server import BentoServer

TRIVIAL = "load_tests.trivial_service:TrivialService"


@pytest.mark.e2e
@pytest.mark.parametrize("grace_s", [20.0, 0.0])
def test_stop_leaves_no_worker_behind(tmp_path: Path, grace_s: float) -> None:
    server = BentoServer(
        {"BENTOML_HOME": str(tmp_path / "home")},
        target=TRIVIAL,
        workers=2,
        log=tmp_path / "serve.log",
    ).start()
    arbiter = psutil.Process(server.process.pid)
    family = [arbiter, *arbiter.children(recursive=True)]
    assert len(family) >= 3, server.output()  # the arbiter and two workers
    # No grace: SIGKILL at once, to workers in sessions of their own as well.
    server.stop(grace_s=grace_s)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []
