"""The baseline of `make bench` (e): a BentoML endpoint that returns a constant.

Served exactly as service.py is (BentoML's runtime options from serving/runtime.py, the
same request fields, a pydantic response), so the difference is the fraud service's own
work: features, model, admission control and the body limits.
"""

from __future__ import annotations

from typing import Annotated

import bentoml
from pydantic import BaseModel, Field

from features import ENTITY_ID_MAX_LEN, ENTITY_ID_PATTERN
from serving.runtime import service_config

EntityId = Annotated[
    str, Field(min_length=1, max_length=ENTITY_ID_MAX_LEN, pattern=ENTITY_ID_PATTERN)
]


class Constant(BaseModel):
    """Always the same answer."""

    fraud_probability: float


_ANSWER = Constant(fraud_probability=0.5)


@bentoml.service(**service_config())
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
