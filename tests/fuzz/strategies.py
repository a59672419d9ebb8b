"""Hypothesis strategies shared by the fuzz tests: wrong-typed and out-of-range values, any JSON value, documents
mutated away from a valid one, and the one-line refusal every failure must be."""

from __future__ import annotations

import copy
import math
import os
import zlib

from hypothesis import seed, settings
from hypothesis import strategies as st

from distilbert_cli.errors import UsageError

# Examples per test (tests/fuzz/conftest.py loads the profile): `keys` for each (command, key) of the schema test,
# `readers` for each data reader.
BUDGETS = {"ci": {"keys": 2, "readers": 60}, "nightly": {"keys": 100, "readers": 3000}}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def budget(kind: str) -> settings:
    """The settings of a fuzz test of `kind` ("keys" or "readers") under the profile HYPOTHESIS_PROFILE names."""
    return settings(max_examples=BUDGETS[PROFILE][kind])


def seeded_by(name: str):
    """In CI, examples drawn from a seed of `name` (a derandomized test draws the same examples for every parameter
    of a parametrized test: each key gets its own this way, the same on every run); nightly, fresh ones."""
    return seed(zlib.crc32(name.encode())) if PROFILE == "ci" else (lambda test: test)


# Scalars at the edges: huge and negative integers, non-finite and tiny floats, text with the characters config
# syntax and file systems care about.
EDGE_INTEGERS = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                          st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64]))
EDGE_FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308]))
TEXT = st.one_of(st.text(max_size=20),
                 st.sampled_from(["", "..", "/", "???", "${oc.env:HOME}", "${missing}", "a:b", "[1,2", "{a:", "'",
                                  "\\", "a=b", "null", "1e999", "\x00", "é\n\t"]))
SCALARS = st.one_of(st.none(), st.booleans(), EDGE_INTEGERS, EDGE_FLOATS, TEXT)
CONFIG_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                          st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), SCALARS, max_size=2))

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 64), max_value=2 ** 64),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)


def hydra_value(value) -> str:
    """A Python value as Hydra override syntax (strings quoted, so that a value keeps its type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(map(hydra_value, value)) + "]"
    return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"


@st.composite
def mutated(draw, document):
    """`document` (JSON-like) changed in one to three places: a node replaced by any JSON value, a key removed or
    added, an entry of a list removed or added."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        document = _mutate(draw, document)
    return document


def _mutate(draw, node):
    children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
    action = draw(st.sampled_from(["replace", "descend", "descend", "remove", "add"] if children else
                                  ["replace", "add"] if isinstance(node, dict | list) else ["replace"]))
    if action == "replace":
        return draw(JSON_VALUES)
    if action == "add":
        if isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            node.insert(draw(st.integers(0, len(node))), draw(JSON_VALUES))
        return node
    child = draw(st.sampled_from(children))
    if action == "remove":
        del node[child]
    else:
        node[child] = _mutate(draw, node[child])
    return node


def one_error_line(result) -> str:
    """A CLI result that failed: exit 2 and exactly one `error:` line, no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output, result.output
    return errors[0]


def refused_or_read(read):
    """`read()`'s result, or None when it refused with a UsageError; any other exception fails. (The CLI prints a
    UsageError as one line whatever it quotes: a key or file name may hold a line break.)"""
    try:
        return read()
    except UsageError as exc:
        assert str(exc).strip(), "an empty message"
        return None
