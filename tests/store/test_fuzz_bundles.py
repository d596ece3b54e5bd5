"""A fixed-seed sample of the bundle fuzzer (benchmarks/fuzz_bundles.py; the full run is in README.md's
"Reliability" section): every malformed bundle either raises a `BundleError` or, when bundle.json was rewritten
to match consistent content, loads; nothing else escapes and nothing altered loads behind an untouched manifest."""

import time
from collections import Counter

import pytest
from fuzz_bundles import KINDS, LOADERS, fuzz  # benchmarks/ is on pytest's pythonpath (pyproject.toml)

CASES = 400


@pytest.mark.slow
def test_fuzzed_bundles_raise_bundle_errors_only(tmp_path):
    start = time.perf_counter()
    results = fuzz(CASES, seed=14, in_process=True, work=tmp_path)
    elapsed = time.perf_counter() - start
    outcomes = Counter(r["outcome"] for r in results)
    bad = [f"{r['loader']}: {r['outcome']}: {r['mutation']} → {r.get('error')}" for r in results
           if r["outcome"] not in ("BundleError", "loaded")]
    assert not bad, "\n".join(bad[:20])
    assert len(results) == CASES * len(LOADERS)
    assert outcomes["BundleError"] > 0.7 * len(results)  # the mutations do damage
    assert set(r["kind"] for r in results) == set(KINDS)
    assert max(r.get("message_chars", 0) for r in results) < 2000
    assert max(r["seconds"] for r in results) < 10.0, elapsed
