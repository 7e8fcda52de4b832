"""REST produce/batch splits a JSON array body into messages: orjson's one-parse fast path must give
exactly what the element-by-element walk gives, and leave to the walk every body where they could differ."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.errors import InvalidArgument
from gateway.servicers import produce
from gateway.servicers.produce import _parsed_elements, json_elements


def walked(body: bytes, max_count: int = 5000) -> list[bytes] | str:
    """What the walk alone answers (the elements, or the error's message)."""
    saved = produce._parsed_elements
    produce._parsed_elements = lambda body, max_count: None
    try:
        return json_elements(body, max_count)
    except InvalidArgument as exc:
        return exc.message
    finally:
        produce._parsed_elements = saved


def answered(body: bytes, max_count: int = 5000) -> list[bytes] | str:
    try:
        return json_elements(body, max_count)
    except InvalidArgument as exc:
        return exc.message


def message(i: int) -> dict[str, object]:
    return {"id": i, "name": f"order-{i}", "price": i * 1.25, "tags": ["a", "b"], "ok": i % 2 == 0, "note": None}


def test_a_usual_batch_takes_the_fast_path_with_the_walks_answer() -> None:
    body = json.dumps([message(i) for i in range(100)], indent=1).encode()
    fast = _parsed_elements(body, 5000)
    assert fast is not None
    assert fast == walked(body)
    assert fast[3] == b'{"id":3,"name":"order-3","price":3.75,"tags":["a","b"],"ok":false,"note":null}'


@pytest.mark.parametrize(
    "body",
    [
        b'[{"n": 18446744073709551616, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',  # beyond 64 bits
        b'[{"n": -9223372036854775809, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',
        b'[{"n": 1e400, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',  # inf: null
        b'[{"s": "\\ud800", "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',  # lone surrogate
        b'{"not": "an array", "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}',
        b"[" + b",".join([b'"xxxxxxxxxxxxxxxxxxxxxxxxxx"'] * 6) + b"]",  # more than max_count (5)
        b"[" + b"[" * 300 + b"]" * 300 + b', "' + b"x" * 5000 + b'"]',  # deeper than orjson writes
        b'\xef\xbb\xbf[{"bom": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',
        b'[{"a": NaN, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]',
    ],
)
def test_where_orjson_could_differ_the_walk_decides(body: bytes) -> None:
    assert _parsed_elements(body, 5) is None
    assert answered(body, 5) == walked(body, 5)


def test_big_integers_keep_every_digit() -> None:
    body = b'[{"n": 123456789012345678901234567890, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]'
    assert answered(body) == [b'{"n":123456789012345678901234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}']


def test_the_fast_path_holds_few_objects() -> None:
    """Its Python objects are bounded by the body's tokens (50,000): beyond, the walk, one element at a time."""
    under = b"[" + b",".join([b"0"] * 49_999) + b"]"
    assert _parsed_elements(under, 100_000) == [b"0"] * 49_999
    over = b"[" + b",".join([b"[0]"] * 25_001) + b"]"  # 50,001 tokens
    assert _parsed_elements(over, 100_000) is None
    assert answered(over, 100_000) == [b"[0]"] * 25_001


_SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_VALUES, max_size=8), st.sampled_from([None, 1, 2]), st.text(alphabet=" \t\r\n", max_size=2))
def test_the_fast_path_answers_what_the_walk_answers(values: list[object], indent: int | None, ws: str) -> None:
    body = (ws + json.dumps(values, indent=indent) + ws).encode()
    assert answered(body) == walked(body)
    padded = (ws + json.dumps([{"v": v, "pad": "x" * 200} for v in values], indent=indent) + ws).encode()
    assert answered(padded) == walked(padded)
