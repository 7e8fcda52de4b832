"""``google.api.http`` path templates: parse once, match many request paths.

The grammar (``google/api/http.proto``)::

    Template  = "/" Segments [ Verb ] ;
    Segments  = Segment { "/" Segment } ;
    Segment   = "*" | "**" | LITERAL | Variable ;
    Variable  = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb      = ":" LITERAL ;

``{var}`` means ``{var=*}``. The verb is what follows the last ``:`` of the final
segment, or the first ``:`` after a closing ``}`` (so ``/{name}:publish`` works).
``/`` alone is the root template. ``**`` matches zero or more segments and may
appear once, followed only by fixed segments.

Matching follows grpc-gateway (``runtime/pattern.go``) with the spec's unescaping:
a single-segment capture is fully percent-decoded; a multi-segment capture is
joined with ``/`` and decoded except ``%2F``, which stays encoded. A malformed
escape raises :class:`MalformedPathError` (HTTP 400), it is not a mismatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = [
    "DeepWildcard",
    "InvalidTemplateError",
    "Literal",
    "MalformedPathError",
    "PathTemplate",
    "Segment",
    "Template",
    "Variable",
    "Wildcard",
    "compile_template",
    "parse_template",
    "split_path",
    "unescape",
]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 3986 pchar minus what the template grammar reserves ("/{}=*:").
_LITERAL = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;@]|%[0-9A-Fa-f]{2})+")
_LITERAL_COLON = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;@:]|%[0-9A-Fa-f]{2})+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASH_ESCAPE = re.compile(r"(%2[Ff])")


class InvalidTemplateError(ValueError):
    """A path template that does not follow the grammar."""

    def __init__(self, template: str, msg: str) -> None:
        super().__init__(f"invalid path template {template!r}: {msg}")
        self.template = template
        self.msg = msg


class MalformedPathError(ValueError):
    """A request path with a malformed percent-escape or non-UTF-8 bytes."""


@dataclass(frozen=True, slots=True)
class Literal:
    value: str  # percent-decoded


@dataclass(frozen=True, slots=True)
class Wildcard:
    pass


@dataclass(frozen=True, slots=True)
class DeepWildcard:
    pass


@dataclass(frozen=True, slots=True)
class Variable:
    field_path: str  # dotted, e.g. "a.b"
    segments: tuple[Literal | Wildcard | DeepWildcard, ...]


Segment = Literal | Wildcard | DeepWildcard | Variable


@dataclass(frozen=True, slots=True)
class Template:
    """The parse tree of a template."""

    source: str
    segments: tuple[Segment, ...]
    verb: str


class _Parser:
    def __init__(self, template: str) -> None:
        self.src = template
        self.pos = 0
        self.fields: list[str] = []

    def fail(self, msg: str) -> InvalidTemplateError:
        return InvalidTemplateError(self.src, f"{msg} at offset {self.pos}")

    def peek(self, n: int = 1) -> str:
        return self.src[self.pos : self.pos + n]

    def parse(self) -> Template:
        if not self.src.startswith("/"):
            raise self.fail("must start with '/'")
        if self.src == "/":
            return Template(self.src, (), "")
        self.pos = 1
        segments = self.segments(in_variable=False)
        verb = ""
        if self.peek() == ":":
            self.pos += 1
            m = _LITERAL_COLON.match(self.src, self.pos)
            if m is None or m.end() != len(self.src):
                raise self.fail("invalid verb")
            verb = _decode_literal(m.group(), self.src)
            self.pos = m.end()
        if self.pos != len(self.src):
            raise self.fail(f"unexpected {self.peek()!r}")
        self.check_deep(segments)
        return Template(self.src, segments, verb)

    def segments(self, *, in_variable: bool) -> tuple[Segment, ...]:
        out = [self.segment(in_variable=in_variable)]
        while self.peek() == "/":
            self.pos += 1
            out.append(self.segment(in_variable=in_variable))
        return tuple(out)

    def segment(self, *, in_variable: bool) -> Segment:
        if self.peek(2) == "**":
            self.pos += 2
            return DeepWildcard()
        if self.peek() == "*":
            self.pos += 1
            return Wildcard()
        if self.peek() == "{":
            if in_variable:
                raise self.fail("nested variable")
            return self.variable()
        m = (_LITERAL if in_variable else _LITERAL_COLON).match(self.src, self.pos)
        if m is None:
            raise self.fail("empty or invalid segment")
        text = m.group()
        self.pos = m.end()
        if ":" in text and self.pos == len(self.src):
            # The final segment: its last ':' starts the verb.
            text, _, verb = text.rpartition(":")
            self.pos -= len(verb) + 1
            if not text:
                raise self.fail("empty segment before the verb")
        return Literal(_decode_literal(text, self.src))

    def variable(self) -> Variable:
        self.pos += 1  # "{"
        parts = []
        while True:
            m = _IDENT.match(self.src, self.pos)
            if m is None:
                raise self.fail("invalid field path")
            parts.append(m.group())
            self.pos = m.end()
            if self.peek() != ".":
                break
            self.pos += 1
        path = ".".join(parts)
        if path in self.fields:
            raise self.fail(f"field {path!r} bound twice")
        self.fields.append(path)
        segments: tuple[Segment, ...] = (Wildcard(),)
        if self.peek() == "=":
            self.pos += 1
            segments = self.segments(in_variable=True)
        if self.peek() != "}":
            raise self.fail("expected '}'")
        self.pos += 1
        return Variable(path, segments)  # type: ignore[arg-type]

    def check_deep(self, segments: tuple[Segment, ...]) -> None:
        flat = [s for seg in segments for s in (seg.segments if isinstance(seg, Variable) else (seg,))]
        if sum(isinstance(s, DeepWildcard) for s in flat) > 1:
            raise InvalidTemplateError(self.src, "'**' may appear only once")


def _decode_literal(text: str, template: str) -> str:
    try:
        return _unescape(text, keep_slash=False)
    except MalformedPathError as exc:
        raise InvalidTemplateError(template, str(exc)) from None


def parse_template(template: str) -> Template:
    """Parse ``template`` into its segments and verb; raise InvalidTemplateError."""
    return _Parser(template).parse()


def _unescape(text: str, *, keep_slash: bool) -> str:
    if "%" not in text:
        return text
    if _BAD_ESCAPE.search(text):
        raise MalformedPathError(f"malformed percent-escape in {text!r}")
    try:
        if not keep_slash:
            return unquote_to_bytes(text).decode("utf-8")
        parts = _SLASH_ESCAPE.split(text)
        return "".join(p if i % 2 else unquote_to_bytes(p).decode("utf-8") for i, p in enumerate(parts))
    except UnicodeDecodeError:
        raise MalformedPathError(f"percent-escapes in {text!r} are not UTF-8") from None


def unescape(segment: str) -> str:
    """Percent-decode one path segment (UTF-8); MalformedPathError on a bad escape."""
    return _unescape(segment, keep_slash=False)


def split_path(path: str) -> list[str]:
    """The raw (still escaped) components of a request path ("/a/b" -> ["a", "b"])."""
    if not path.startswith("/"):
        raise MalformedPathError("path must start with '/'")
    return path[1:].split("/")


# Compiled form: the component index of every literal to compare and of every
# capture, counted from the end (negative) after a "**", so that no per-request
# arithmetic is needed beyond the length check.


class PathTemplate:
    """A compiled template: ``match(path)`` gives the captured fields or None."""

    __slots__ = ("_captures", "_deep", "_lits", "_nops", "fields", "first_literal", "source", "template", "verb")

    def __init__(self, template: Template) -> None:
        self.template = template
        self.source = template.source
        self.verb = template.verb
        flat: list[Literal | Wildcard | DeepWildcard] = []
        spans: list[tuple[str, int, int, bool]] = []
        for seg in template.segments:
            if isinstance(seg, Variable):
                start = len(flat)
                flat.extend(seg.segments)
                multi = len(seg.segments) > 1 or isinstance(seg.segments[0], DeepWildcard)
                spans.append((seg.field_path, start, len(flat), multi))
            else:
                flat.append(seg)
        n = len(flat)
        deep = next((i for i, s in enumerate(flat) if isinstance(s, DeepWildcard)), -1)
        self._nops = n
        self._deep = deep

        def start_of(i: int) -> int:
            return i if deep < 0 or i <= deep else i - n

        def end_of(i: int) -> int | None:  # exclusive end of op i, as a slice bound
            if deep < 0 or i < deep:
                return i + 1
            end = i + 1 - n
            return end or None

        self._lits = tuple((start_of(i), s.value) for i, s in enumerate(flat) if isinstance(s, Literal))
        self._captures = tuple((path, start_of(lo), end_of(hi - 1), multi) for path, lo, hi, multi in spans)
        self.fields: tuple[str, ...] = tuple(c[0] for c in spans)
        # The literal the first path component must equal (decoded), if any: a cheap pre-filter.
        first_is_lit = bool(flat) and isinstance(flat[0], Literal) and (n > 1 or not self.verb)
        self.first_literal: str | None = flat[0].value if first_is_lit else None  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"PathTemplate({self.source!r})"

    def match(self, path: str) -> dict[str, str] | None:
        """Match a raw request path (no query string); None when it does not match."""
        return self.match_components(split_path(path))

    def match_components(self, components: list[str], *, fold: bool = False) -> dict[str, str] | None:
        """Match the output of :func:`split_path`; raise MalformedPathError on a bad escape.

        ``fold``: literal segments compare case-insensitively (captured values keep their case)."""
        n = len(components)
        if self._deep < 0:
            if n != self._nops:
                return None if self._nops or components != [""] or self.verb else {}
        elif n < self._nops - 1:
            return None
        verb = self.verb
        if verb:
            last = components[-1]
            if len(last) <= len(verb) + 1 or not last.endswith(verb) or last[-len(verb) - 1] != ":":
                return None
            components = [*components[:-1], last[: -len(verb) - 1]]
        for i, lit in self._lits:
            c = components[i]
            if c != lit and ("%" not in c or _unescape(c, keep_slash=False) != lit):
                if not fold or _unescape(c, keep_slash=False).lower() != lit.lower():
                    return None
        out: dict[str, str] = {}
        for path, lo, hi, multi in self._captures:
            if multi:
                out[path] = _unescape("/".join(components[lo:hi]), keep_slash=True)
            else:
                out[path] = _unescape(components[lo], keep_slash=False)
        return out


def compile_template(template: str) -> PathTemplate:
    """Parse and compile ``template``; raise InvalidTemplateError."""
    return PathTemplate(parse_template(template))
