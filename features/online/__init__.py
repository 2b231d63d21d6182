"""The online read path: keys, the cache, one module per store tier, and the orchestrator
that runs them in turn under one deadline (store.py)."""

from features.online.entry import FeatureRows, GroupRead, Reason, Source
from features.online.from_settings import open_store
from features.online.keys import Key
from features.online.store import FeatureStore
from features.online.tier import Answer, Tier

__all__ = [
    "Answer",
    "FeatureRows",
    "FeatureStore",
    "GroupRead",
    "Key",
    "Reason",
    "Source",
    "Tier",
    "open_store",
]
