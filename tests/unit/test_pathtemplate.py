"""Path templates: the grammar, compilation and matching (gateway.transcoding.pathtemplate)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.transcoding.pathtemplate import (
    DeepWildcard,
    InvalidTemplateError,
    Literal,
    MalformedPathError,
    Variable,
    Wildcard,
    compile_template,
    parse_template,
)

PARSE_CASES = [
    ("/", (), ""),
    ("/v1", (Literal("v1"),), ""),
    ("/v1/*", (Literal("v1"), Wildcard()), ""),
    ("/v1/**", (Literal("v1"), DeepWildcard()), ""),
    ("/v1/{name}", (Literal("v1"), Variable("name", (Wildcard(),))), ""),
    ("/v1/{a.b.c}", (Literal("v1"), Variable("a.b.c", (Wildcard(),))), ""),
    (
        "/v1/{name=projects/*/topics/*}",
        (Literal("v1"), Variable("name", (Literal("projects"), Wildcard(), Literal("topics"), Wildcard()))),
        "",
    ),
    ("/v1/{name=**}", (Literal("v1"), Variable("name", (DeepWildcard(),))), ""),
    ("/v1/{name}:publish", (Literal("v1"), Variable("name", (Wildcard(),))), "publish"),
    ("/v1/{name=topics/*}:publish", (Literal("v1"), Variable("name", (Literal("topics"), Wildcard()))), "publish"),
    ("/v1/echo:search", (Literal("v1"), Literal("echo")), "search"),
    ("/v1/a:b:c", (Literal("v1"), Literal("a:b")), "c"),  # the last ':' of a final literal
    ("/v1/{x}:a:b", (Literal("v1"), Variable("x", (Wildcard(),))), "a:b"),  # the first ':' after '}'
    ("/a:b/c", (Literal("a:b"), Literal("c")), ""),  # ':' inside an inner literal
    ("/*:verb", (Wildcard(),), "verb"),
    ("/v1/%7Euser", (Literal("v1"), Literal("~user")), ""),
    (
        "/stations/{station}/produce/single",
        (Literal("stations"), Variable("station", (Wildcard(),)), Literal("produce"), Literal("single")),
        "",
    ),
]


@pytest.mark.parametrize(("template", "segments", "verb"), PARSE_CASES)
def test_parse(template: str, segments: tuple[object, ...], verb: str) -> None:
    parsed = parse_template(template)
    assert parsed.segments == segments
    assert parsed.verb == verb


INVALID = [
    ("", "must start with '/'"),
    ("v1/x", "must start with '/'"),
    ("/v1/", "empty or invalid segment"),
    ("//", "empty or invalid segment"),
    ("/v1//x", "empty or invalid segment"),
    ("/{x", "expected '}'"),
    ("/{x=a", "expected '}'"),
    ("/{}", "invalid field path"),
    ("/{1x}", "invalid field path"),
    ("/{a.}", "invalid field path"),
    ("/{x}/{x}", "bound twice"),
    ("/{a={b}}", "nested variable"),
    ("/**/**", "'**' may appear only once"),
    ("/{a=**}/{b=**}", "'**' may appear only once"),
    ("/v1:", "invalid verb"),
    ("/{x}:", "invalid verb"),
    ("/{x}:a/b", "invalid verb"),
    ("/a{b}", "unexpected '{'"),
    ("/a}", "unexpected '}'"),
    ("/a b", "unexpected ' '"),
    ("/a%zz", "unexpected '%'"),
    ("/a?x", "unexpected '?'"),
    ("/:verb", "empty segment before the verb"),
]


@pytest.mark.parametrize(("template", "message"), INVALID)
def test_invalid(template: str, message: str) -> None:
    with pytest.raises(InvalidTemplateError) as info:
        compile_template(template)
    assert message in str(info.value)
    assert info.value.template == template


MATCH_CASES: list[tuple[str, str, dict[str, str] | None]] = [
    ("/", "/", {}),
    ("/", "/a", None),
    ("/v1", "/v1", {}),
    ("/v1", "/v1/", None),
    ("/v1", "/v2", None),
    ("/v1/*", "/v1/x", {}),
    ("/v1/*", "/v1/x/y", None),
    ("/v1/*", "/v1", None),
    ("/v1/{name}", "/v1/abc", {"name": "abc"}),
    ("/v1/{name}", "/v1/a%20b", {"name": "a b"}),
    ("/v1/{name}", "/v1/a%2Fb", {"name": "a/b"}),  # one segment: fully decoded
    ("/v1/{name}", "/v1/%C3%A9t%C3%A9", {"name": "été"}),
    ("/v1/{name}", "/v1/", {"name": ""}),
    ("/v1/{a.b}", "/v1/q", {"a.b": "q"}),
    ("/v1/{name=projects/*/topics/*}", "/v1/projects/p1/topics/t1", {"name": "projects/p1/topics/t1"}),
    ("/v1/{name=projects/*/topics/*}", "/v1/projects/p1/subs/t1", None),
    ("/v1/{name=projects/*/topics/*}", "/v1/projects/p%2F1/topics/t%201", {"name": "projects/p%2F1/topics/t 1"}),
    ("/v1/{name=projects/*/topics/*}", "/v1/projects/p%2f1/topics/t1", {"name": "projects/p%2f1/topics/t1"}),
    ("/v1/{path=**}", "/v1/a/b/c", {"path": "a/b/c"}),
    ("/v1/{path=**}", "/v1", {"path": ""}),
    ("/v1/{path=**}", "/v1/", {"path": ""}),
    ("/v1/{path=**}/end", "/v1/a/b/end", {"path": "a/b"}),
    ("/v1/{path=**}/end", "/v1/end", {"path": ""}),
    ("/v1/{path=**}/end", "/v1/a/b/ending", None),
    ("/v1/{a}/{path=**}/{b}", "/v1/x/m/n/y", {"a": "x", "path": "m/n", "b": "y"}),
    ("/v1/**/{b}", "/v1/m/n/y", {"b": "y"}),
    ("/v1/{p=files/**}", "/v1/files/a/b", {"p": "files/a/b"}),
    ("/v1/{p=files/**}", "/v1/other/a", None),
    ("/v1/{name}:publish", "/v1/foo:publish", {"name": "foo"}),
    ("/v1/{name}:publish", "/v1/foo", None),
    ("/v1/{name}:publish", "/v1/:publish", None),
    ("/v1/{name}:publish", "/v1/foo:other", None),
    ("/v1/{name}:publish", "/v1/a:b:publish", {"name": "a:b"}),
    ("/v1/{name}", "/v1/foo:publish", {"name": "foo:publish"}),  # no verb: the colon is data
    ("/v1/{name=topics/*}:publish", "/v1/topics/t1:publish", {"name": "topics/t1"}),
    ("/v1/echo:search", "/v1/echo:search", {}),
    ("/v1/%7Euser", "/v1/~user", {}),
    ("/v1/~user", "/v1/%7Euser", {}),  # literals compare decoded
    ("/stations/{station}/produce/single", "/stations/My.Station/produce/single", {"station": "My.Station"}),
    ("/stations/{station}/produce/single", "/stations/abc/produce/batch", None),
]


@pytest.mark.parametrize(("template", "path", "expected"), MATCH_CASES)
def test_match(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert compile_template(template).match(path) == expected


@pytest.mark.parametrize("path", ["/v1/%zz", "/v1/%2", "/v1/%C3", "/v1/%FF"])
def test_malformed_escape_is_an_error_not_a_mismatch(path: str) -> None:
    with pytest.raises(MalformedPathError):
        compile_template("/v1/{name}").match(path)


def test_fields_in_declaration_order() -> None:
    assert compile_template("/v1/{b}/x/{a.c=**}").fields == ("b", "a.c")


_SEGMENT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"), max_size=8)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_random_paths_never_raise_anything_but_malformed(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    for template in ("/v1/{name}", "/v1/{p=**}/end", "/{a}/{b=x/*}:go", "/"):
        try:
            result = compile_template(template).match(path)
        except MalformedPathError:
            continue
        assert result is None or isinstance(result, dict)


@given(st.text(max_size=30))
def test_random_templates_parse_or_fail_cleanly(text: str) -> None:
    try:
        compile_template(text)
    except InvalidTemplateError:
        pass


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20))
def test_single_segment_roundtrip(value: str) -> None:
    from urllib.parse import quote

    assert compile_template("/v1/{name}").match("/v1/" + quote(value, safe="")) == {"name": value}
