"""The baseline of `make bench` (e): a BentoML endpoint that returns a constant.

Served exactly as service.py is (same workers, access log off, same request fields,
a pydantic response), so the difference is the fraud service's own work.
"""

from __future__ import annotations

import os
from typing import Annotated

import bentoml
from pydantic import BaseModel, Field

from features import ENTITY_ID_MAX_LEN, ENTITY_ID_PATTERN

EntityId = Annotated[
    str, Field(min_length=1, max_length=ENTITY_ID_MAX_LEN, pattern=ENTITY_ID_PATTERN)
]


class Constant(BaseModel):
    """Always the same answer."""

    fraud_probability: float


_ANSWER = Constant(fraud_probability=0.5)


@bentoml.service(
    workers=int(os.environ.get("FRAUD_WORKERS", "1")),
    logging={"access": {"enabled": os.environ.get("FRAUD_ACCESS_LOG", "") == "1"}},
    traffic={"timeout": 10},
)
class TrivialService:
    """Answers /predict with a constant."""

    @bentoml.api
    async def predict(
        self,
        user_id: EntityId,
        merchant_id: EntityId,
        amount: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)],
        timestamp: float | None = None,
    ) -> Constant:
        """A constant, after the same request validation as the real /predict."""
        return _ANSWER
