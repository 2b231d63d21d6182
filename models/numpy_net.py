"""FraudNet's forward pass on NumPy arrays, for serving.

At batch 1 the net is a few hundred multiply-adds; what costs is the framework around them.
Called in a loop, the frozen TorchScript module takes ~25 us. Called as a service calls it
(once per request, with other work in between, so its code is no longer in the CPU's
caches), it takes ~400 us, against ~100 us for these NumPy calls (docs/performance.md).
Training and the saved model stay PyTorch's; this reads the trained weights once.

The input scaling is folded into the first Linear layer:
((s - mean) / std) @ W.T + b  ==  s @ (W.T / std[:, None]) + (b - (mean / std) @ W.T).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from torch import nn

from models.net import FraudNet

Matrix = npt.NDArray[np.float32]


class UnsupportedNet(ValueError):
    """The net has a layer this evaluator does not implement."""


class NumpyNet:
    """Fraud probabilities from raw model inputs, shape (n, n_inputs) -> (n,)."""

    def __init__(self, layers: list[tuple[Matrix, Matrix, bool]]) -> None:
        self._layers = layers  # (weights as (in, out), bias, ReLU after)

    @classmethod
    def of(cls, net: FraudNet) -> NumpyNet:
        """The trained `net`'s weights, read once; UnsupportedNet names a layer other
        than Linear or ReLU."""
        state = {
            k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()
        }
        mean, std = state["mean"], state["std"]
        layers: list[tuple[Matrix, Matrix, bool]] = []
        for index, layer in enumerate(net.layers):
            if isinstance(layer, nn.ReLU) and layers and not layers[-1][2]:
                weights, bias, _ = layers[-1]
                layers[-1] = (weights, bias, True)
            elif isinstance(layer, nn.Linear):
                weights = state[f"layers.{index}.weight"].T.copy()
                bias = state[f"layers.{index}.bias"]
                if not layers:  # fold the scaling in
                    bias = (bias - (mean / std) @ weights).astype(np.float32)
                    weights = (weights / std[:, None]).astype(np.float32)
                layers.append((np.ascontiguousarray(weights), bias, False))
            else:
                raise UnsupportedNet(f"layer {index}: {type(layer).__name__}")
        if not layers or layers[-1][0].shape[1] != 1 or layers[-1][2]:
            raise UnsupportedNet("the last layer must be a Linear with one output")
        return cls(layers)

    def __call__(self, x: Matrix) -> Matrix:
        h = np.log1p(np.abs(x))
        np.copysign(h, x, out=h)  # sign(x) * log1p(|x|)
        for weights, bias, relu in self._layers:
            h = h @ weights
            h += bias
            if relu:
                np.maximum(h, 0.0, out=h)
        z = h[:, 0]
        # sigmoid(z) = (1 + tanh(z / 2)) / 2: no overflow for any z.
        z *= 0.5
        np.tanh(z, out=z)
        z += 1.0
        z *= 0.5
        return z
