"""FraudNet: a small MLP that carries its own input scaling."""

from __future__ import annotations

import torch
from torch import nn

# Binary and constant columns can have a std of 0; this keeps them finite.
_MIN_STD = 1e-3


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log1p(|x|): tames heavy-tailed amounts and counts, keeps the sign."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


class FraudNet(nn.Module):
    """Fraud probability from raw model inputs (MODEL_FEATURES order), shape (n,)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_inputs: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        # Buffers, not parameters: saved in the state_dict, never trained.
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float().clamp_min(_MIN_STD))
        self.layers = nn.Sequential(
            nn.Linear(n_inputs, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 1),
        )

    @classmethod
    def for_inputs(cls, x: torch.Tensor) -> FraudNet:
        """A new net whose scaling is fitted to the training inputs `x`."""
        logged = signed_log1p(x)
        return cls(x.shape[1], logged.mean(dim=0), logged.std(dim=0))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Log-odds of fraud, shape (n,); training uses these for a stable loss."""
        scaled = (signed_log1p(x) - self.mean) / self.std
        logits: torch.Tensor = self.layers(scaled)
        return logits.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
