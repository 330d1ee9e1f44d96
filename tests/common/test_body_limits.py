"""JSON bodies that would crash a parser, a validator or a tokenizer are 400s that say why."""

import json

import pytest

from rbee_fleet.common import body_limits
from rbee_fleet.common.errors import BadRequest
from rbee_fleet.common.http import parse_json


def refused(raw: bytes | str) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_json(raw.encode() if isinstance(raw, str) else raw)
    assert info.value.status == 400
    return info.value


def test_a_normal_request_passes_untouched():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 🐝"}], "max_tokens": 5, "temperature": 0.5}
    assert parse_json(json.dumps(body).encode()) == body


@pytest.mark.parametrize("depth", [body_limits.MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_refused(depth):
    assert "nested too deeply" in refused("[" * depth + "]" * depth).message
    assert "nested too deeply" in refused('{"a":' * depth + "1" + "}" * depth).message


def test_nesting_within_the_limit_is_accepted():
    depth = body_limits.MAX_DEPTH - 1
    assert parse_json(("{\"a\":" + "[" * depth + "]" * depth + "}").encode())


@pytest.mark.parametrize("digits", [body_limits.MAX_INT_DIGITS + 1, 5000, 100_000])
def test_integers_with_too_many_digits_are_refused(digits):
    assert f"{digits} digits" in refused('{"model": "m", "max_tokens": ' + "9" * digits + "}").message


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(value):
    refused('{"temperature": ' + value + "}")


@pytest.mark.parametrize("raw", [
    r'{"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}',
    r'{"model": "m", "prompt": "ok \udfff then"}',
    r'{"model": "m", "prompt": ["\udc00"]}',
    r'{"\ud800": 1}',
])
def test_lone_surrogates_are_refused_with_the_field(raw):
    err = refused(raw)
    assert "lone UTF-16 surrogate" in err.message and err.param


def test_a_surrogate_pair_is_a_valid_character():
    assert parse_json(br'{"prompt": "\ud83d\udc1d"}')["prompt"] == "🐝"


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe{", b'{"a": 1,}', b"null", b"{} {}"])
def test_malformed_bodies_are_400(raw):
    refused(raw)
