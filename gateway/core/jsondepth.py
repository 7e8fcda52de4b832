"""How deep JSON may nest: orjson parses at most ``MAX_JSON_DEPTH`` levels, and says so in words
that vary by version ("depth limit exceeded"; 3.10: "array and object recursion depth exceeded";
older: "Recursion limit reached")."""

from __future__ import annotations

MAX_JSON_DEPTH = 1024


def too_deep(message: str) -> bool:
    """Whether an orjson decode error's message says the text nests deeper than it parses."""
    why = message.lower()
    return "depth" in why or "recursion" in why
