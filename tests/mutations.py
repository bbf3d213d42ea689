"""Field-by-field mutation of valid JSON documents, for the property tests of every file schema
(safetensors headers, shard indexes, config.json, state-file headers; docs/file-formats.md).

`mutated(doc)` is a Hypothesis strategy: it picks one value anywhere in `doc` (a key's value or
a list item) and replaces it with a hostile one, deletes it, or adds a key; `dumps` writes the
result, turning the markers below into JSON that `json.dumps` cannot write (a number that
overflows to inf, nesting 100,000 deep). `record(kind, ok)` counts tries and survivals; with
RGEMMA_FUZZ_REPORT=1 the table is printed at exit. RGEMMA_FUZZ_EXAMPLES sets the examples per
test (default 60).
"""

from __future__ import annotations

import atexit
import copy
import json
import os
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HUGE = "\x00HUGE\x00"  # -> 1e400 (parses as inf)
DEEP = "\x00DEEP\x00"  # -> [[[...]]] 100,000 deep
EXAMPLES = int(os.environ.get("RGEMMA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("RGEMMA_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck))

hostile = st.one_of(
    st.sampled_from([HUGE, DEEP, None, True, False, -1, 0, 1, 2**64, 2**200, -2**63, 1e12, 0.5,
                     -0.0, 1e308, "", "no", "1", "F32", [], {}, [1, 2], [-1, 5], [0, 2**70],
                     {"role": 1}, "\ud800"]),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.lists(st.integers(-3, 2**40), max_size=4),
)


def paths(doc, prefix=()):
    """Every (path) to a value inside doc, the root excluded."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


@st.composite
def mutated(draw, doc, skip=()):
    """doc with one field replaced / deleted / added (skip: paths whose prefix is skipped)."""
    doc = copy.deepcopy(doc)
    candidates = [p for p in paths(doc) if not any(p[:len(s)] == s for s in skip)]
    path = draw(st.sampled_from(candidates))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    if op == "delete":
        del parent[path[-1]]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(hostile)
    else:
        parent[path[-1]] = draw(hostile)
    return doc


def dumps(doc) -> bytes:
    """JSON bytes of a mutated doc, markers expanded; lone surrogates written as raw bytes."""
    text = json.dumps(doc, ensure_ascii=False)
    text = text.replace(json.dumps(HUGE), "1e400").replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    return text.encode("utf-8", "surrogatepass")


_counts: dict[str, Counter] = {}


def record(kind: str, ok: bool) -> None:
    """Count one try of `kind`; ok = refused with one RgemmaError line, or loaded correctly."""
    c = _counts.setdefault(kind, Counter())
    c["tries"] += 1
    c["survived"] += bool(ok)


def attempt(kind: str, load, check) -> None:
    """One try: `load()` must raise a one-line RgemmaError, or return something `check`
    accepts (a correct load); anything else fails the test. Counted by `record`."""
    from rgemma_cli.errors import RgemmaError
    try:
        result = load()
    except RgemmaError as e:
        record(kind, "\n" not in str(e))
        assert "\n" not in str(e), str(e)
        return
    except BaseException:
        record(kind, False)
        raise
    try:
        check(result)
    except BaseException:
        record(kind, False)
        raise
    record(kind, True)


@atexit.register
def _report():
    if os.environ.get("RGEMMA_FUZZ_REPORT") and _counts:
        print("\n| kind | tries | survived |\n|---|---|---|")
        for kind, c in sorted(_counts.items()):
            print(f"| {kind} | {c['tries']} | {c['survived']} |")
