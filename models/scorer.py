"""Scorer: a saved FraudNet, evaluated for serving, with the schema it was trained on."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from features import spec
from models.net import FraudNet
from models.numpy_net import Matrix, NumpyNet, UnsupportedNet

MODEL_FILE = "model.pt"
SCHEMA_FILE = "features.json"
logger = logging.getLogger(__name__)


class SchemaMismatch(RuntimeError):
    """The model was trained on feature definitions other than the current ones."""


class Scorer:
    """Fraud probabilities for rows of model inputs, in the saved schema's order."""

    def __init__(self, net: FraudNet, schema: list[dict[str, object]]) -> None:
        self.schema = schema
        self.fingerprint = spec.fingerprint(tuple(_feature(f) for f in schema))
        self.n_features = net.n_inputs
        self._forward = _serving_forward(net.eval())

    @classmethod
    def load(cls, path: str | Path) -> Scorer:
        """The model saved in directory `path` (model.pt and features.json)."""
        directory = Path(path)
        # Threads don't speed up a net this small, and the service runs a worker per CPU.
        torch.set_num_threads(1)
        return cls(read_net(directory / MODEL_FILE), _read_schema(directory / SCHEMA_FILE))

    def check_schema(self) -> None:
        """Raise SchemaMismatch unless features/ still defines what the model learned."""
        _refuse_skew(self.schema, "model")

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Fraud probability per row of `x`, shape (n,)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected shape (n, {self.n_features}), got {x.shape}")
        return self._forward(np.ascontiguousarray(x, dtype=np.float32))


def _serving_forward(net: FraudNet) -> Callable[[Matrix], Matrix]:
    """NumPy's evaluation of `net` (models/numpy_net.py), checked against PyTorch's on a
    probe batch; the frozen TorchScript module for a net it cannot express."""
    rows = np.random.default_rng(0).normal(0.0, 50.0, (64, net.n_inputs))
    probe = torch.from_numpy(rows.astype(np.float32))
    with torch.inference_mode():
        expected = net(probe).numpy()
    try:
        forward: Callable[[Matrix], Matrix] = NumpyNet.of(net)
    except UnsupportedNet as e:
        logger.warning("model served by TorchScript, not NumPy: %s", e)
        return torchscript_forward(net)
    worst = float(np.abs(forward(probe.numpy()) - expected).max())
    if worst > 1e-5:
        raise RuntimeError(f"NumPy's forward pass differs from PyTorch's by {worst:g}")
    return forward


def torchscript_forward(net: FraudNet) -> Callable[[Matrix], Matrix]:
    """The frozen TorchScript module of `net`, called on NumPy rows."""
    # Traced with a batch of 2 so that nothing specialises to a batch of 1.
    example = torch.zeros(2, net.n_inputs)
    with warnings.catch_warnings():
        # TorchScript is deprecated, but at batch 1 it beats eager (~21 against ~39 us).
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
        module = torch.jit.freeze(traced)

    def forward(x: Matrix) -> Matrix:
        with torch.inference_mode():
            # forward() directly: Module.__call__'s hook handling costs ~5 us at batch 1.
            probabilities: torch.Tensor = module.forward(torch.from_numpy(x))
        return probabilities.numpy()

    return forward


def check_saved_schema(path: str | Path, name: str) -> None:
    """Raise SchemaMismatch unless the model saved in directory `path` was trained on the
    features features/ defines now. Reads only its features.json, so `bentoml serve` can
    refuse a skewed model before any worker loads it."""
    schema = _read_schema(Path(path) / SCHEMA_FILE)
    for saved in schema:
        _feature(saved)  # a malformed entry is a SchemaMismatch, not a TypeError later
    _refuse_skew(schema, name)


def _refuse_skew(schema: list[dict[str, object]], name: str) -> None:
    diffs = spec.describe_skew(schema)
    if diffs:
        raise SchemaMismatch(f"{name} was trained on other features: " + "; ".join(diffs))


def read_net(path: Path) -> FraudNet:
    """The FraudNet saved at `path` (model.pt)."""
    saved = torch.load(path, weights_only=True)
    state = saved["state_dict"]
    net = FraudNet(int(saved["n_inputs"]), state["mean"], state["std"])
    net.load_state_dict(state)
    return net


def _read_schema(path: Path) -> list[dict[str, object]]:
    raw = json.loads(path.read_text())
    if not isinstance(raw, list) or not all(isinstance(f, dict) for f in raw):
        raise SchemaMismatch(f"{path}: expected a list of feature objects")
    return [dict(f) for f in raw]


def _feature(saved: dict[str, object]) -> spec.Feature:
    # Rebuilt as a Feature so spec.fingerprint() hashes it exactly as it hashes ours.
    name, dtype, default = saved.get("name"), saved.get("dtype"), saved.get("default")
    if not isinstance(default, int | float) or dtype not in {str(d) for d in spec.Dtype}:
        raise SchemaMismatch(f"feature {name!r}: dtype {dtype!r}, default {default!r}")
    return spec.Feature(str(name), spec.Dtype(str(dtype)), default)
