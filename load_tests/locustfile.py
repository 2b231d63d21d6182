"""Traffic for `make load`: skewed demo users and merchants, mostly /predict."""

# locust monkey-patches the standard library at import: it comes first.
from locust import FastHttpUser, between, run_single_user, task  # isort: skip

import itertools
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.offline.demo import merchant_ids, user_ids
from features.spec import GROUPS
from load_tests.skew import SkewedPool

USERS = SkewedPool(user_ids(100_000), head_fraction=0.01, head_share=0.2, seed=1)
MERCHANTS = SkewedPool(merchant_ids(10_000), head_fraction=0.01, head_share=0.2, seed=2)
BATCH_SIZE = 20
GROUP_NAMES = {g.qualified_name for g in GROUPS}
REQUESTS_PER_USER_S = 10.0  # an open-ish load: users x 10 RPS offered, below saturation
_instances = itertools.count()


def _transaction(rng: random.Random) -> dict[str, Any]:
    return {
        "user_id": USERS.draw(rng),
        "merchant_id": MERCHANTS.draw(rng),
        "amount": round(rng.lognormvariate(3.7, 0.9), 2),
    }


def _check_prediction(body: dict[str, Any]) -> str | None:
    p = body.get("fraud_probability")
    if not isinstance(p, float | int) or not 0.0 <= p <= 1.0:
        return f"fraud_probability {p!r}"
    if set(body.get("sources", {})) != GROUP_NAMES:
        return f"sources {body.get('sources')!r}"
    return None


class Scorer(FastHttpUser):
    """A payment gateway asking for scores; ids drawn from seeded skewed pools."""

    # Random waits, ~REQUESTS_PER_USER_S a user on average: independent arrivals. A constant
    # throughput phase-locks the users (spawned at users/s, each on a 100 ms cycle, they
    # fell into two bursts of ten every 100 ms), which measures the bursts, not the service.
    wait_time = between(0.0, 2.0 / REQUESTS_PER_USER_S)

    def on_start(self) -> None:
        self.rng = random.Random(1000 + next(_instances))

    @task(9)
    def predict(self) -> None:
        with self.client.post(
            "/predict", json=_transaction(self.rng), name="/predict", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            problem = _check_prediction(r.json())
            if problem:
                r.failure(problem)

    @task(1)
    def predict_batch(self) -> None:
        txs = [_transaction(self.rng) for _ in range(BATCH_SIZE)]
        with self.client.post(
            "/predict_batch",
            json={"transactions": txs},
            name=f"/predict_batch[{BATCH_SIZE}]",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            predictions = r.json().get("predictions", [])
            if len(predictions) != BATCH_SIZE:
                r.failure(f"{len(predictions)} predictions for {BATCH_SIZE} transactions")
                return
            for body in predictions:
                problem = _check_prediction(body)
                if problem:
                    r.failure(problem)
                    return


if __name__ == "__main__":
    # Debug one user against a running service: python load_tests/locustfile.py
    Scorer.host = "http://127.0.0.1:3000"
    run_single_user(Scorer)
