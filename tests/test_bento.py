"""`bentoml build` packs the service, the feature layer and the trained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


@pytest.mark.e2e
def test_bentoml_build_packs_service_features_and_model(bentoml_home: Path) -> None:
    bentoml = str(Path(sys.executable).parent / "bentoml")
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    result = subprocess.run(
        [bentoml, "build", "--output", "tag"],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = bentoml_home / "bentos" / name / version
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service:FraudService"
    (model,) = manifest["models"]
    assert model["tag"].startswith("fraud_mlp:")
    # The bento names the exact model version; containerize/export take it from the store.
    model_name, model_version = model["tag"].split(":")
    assert (bentoml_home / "models" / model_name / model_version / "model.pt").exists()
    src = bento / "src"
    for path in ("service.py", "features/online/store.py", "features/spec.py", "models/scorer.py"):
        assert (src / path).exists(), path
    assert not (src / "tests").exists() and not (src / ".pytest_cache").exists()
    assert "redis==" in (bento / "env" / "python" / "requirements.txt").read_text()
