"""The fraud model: network, scorer and the name it is saved under."""

from __future__ import annotations

from models.net import FraudNet
from models.scorer import SchemaMismatch, Scorer

# Not models.train: `python -m models.train` would then run a module already
# imported (runpy warns), and serving has no use for the training code.
MODEL_NAME = "fraud_mlp"

__all__ = ["MODEL_NAME", "FraudNet", "SchemaMismatch", "Scorer"]
