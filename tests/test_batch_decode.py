"""Decoding many replies at once (GroupCodec.decode_found) gives what decoding each
on its own gives: values, reasons, staleness, corrupt-value counts."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from features import HASH_GROUPS, metrics
from features.online.codec import GroupCodec
from tests.test_fuzz import FIELD_BYTES

NOW = 1.8e9
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda i: b"%d" % i),
    st.sampled_from([b"0", b"1", b"1.0", b"-0", b"0.5", b"3.4028235e38", b"1e39"]),
    st.floats(allow_nan=False).map(lambda f: repr(f).encode()),
)
EVENT_TS = st.one_of(
    st.none(),
    st.floats(NOW - 10 * 86400, NOW + 60).map(lambda f: repr(f).encode()),
    st.sampled_from([b"inf", b"-inf", b"nan", b"x", b""]),
)


def corrupt_counts(codec: GroupCodec) -> list[float]:
    return [
        metrics.CORRUPT_VALUES.labels(codec.name, name)._value.get()
        for name in codec.spec.field_names
    ]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_found_equals_decode_one_by_one(data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from(HASH_GROUPS))
    codec = GroupCodec(spec)
    n = len(spec.features)
    mostly_clean = data.draw(st.booleans())
    field = st.one_of(NUMBERS, FIELD_BYTES) if not mostly_clean else NUMBERS
    reply = st.tuples(st.lists(field, min_size=n, max_size=n), EVENT_TS).map(
        lambda t: [*t[0], t[1]]
    )
    replies = data.draw(st.lists(reply, min_size=1, max_size=40))
    replies = [r for r in replies if r.count(None) != len(r)]  # found: one field at least
    before = corrupt_counts(codec)
    batch = codec.decode_found(replies, NOW)
    batch_corrupt = [a - b for a, b in zip(corrupt_counts(codec), before, strict=True)]
    before = corrupt_counts(codec)
    alone = [codec.decode(r, NOW) for r in replies]
    assert [a - b for a, b in zip(corrupt_counts(codec), before, strict=True)] == batch_corrupt
    assert len(batch) == len(alone)
    for (values, read_id, ts), (one_values, one_read_id, one_ts) in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(values, one_values)
        assert ts == one_ts or (math.isnan(ts) and math.isnan(one_ts))
        assert values.dtype == np.float64 and not values.flags.writeable
        assert codec.reads[read_id] == codec.reads[one_read_id]
