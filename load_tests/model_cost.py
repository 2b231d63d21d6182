"""The model step's cost on one row: frozen TorchScript against NumPy, in a tight loop and
with a sleep between calls (as a service calls it, its code gone from the caches).

`python -m load_tests.model_cost [calls]` on the newest saved model (`make train`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.numpy_net import Matrix, NumpyNet
from models.scorer import MODEL_FILE, read_net, torchscript_forward


def _times_us(
    forward: Callable[[Matrix], Matrix], x: Matrix, calls: int, gap_s: float
) -> list[float]:
    for _ in range(200):
        forward(x)
    out = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        forward(x)
        out.append((time.perf_counter() - started) * 1e6)
    return sorted(out)


def main(argv: list[str]) -> int:
    import bentoml  # the model store; models/ itself stays free of bentoml

    from models import MODEL_NAME

    calls = int(argv[0]) if argv else 300
    net = read_net(Path(bentoml.models.get(MODEL_NAME).path) / MODEL_FILE).eval()
    x = np.random.default_rng(0).normal(0.0, 10.0, (1, net.n_inputs)).astype(np.float32)
    forwards: dict[str, Callable[[Matrix], Matrix]] = {
        "TorchScript": torchscript_forward(net),
        "NumPy": NumpyNet.of(net),
    }
    print("| between calls | " + " | ".join(f"{n} p50 / p99" for n in forwards) + " |")
    print("| --- |" + " --- |" * len(forwards))
    for label, gap_s in (("nothing (a tight loop)", 0.0), ("time.sleep(0.003)", 0.003)):
        cells = []
        for forward in forwards.values():
            t = _times_us(forward, x, calls, gap_s)
            cells.append(f"{t[len(t) // 2]:.0f} / {t[int(len(t) * 0.99)]:.0f} us")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
