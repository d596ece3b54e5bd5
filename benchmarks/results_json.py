"""Compact JSON for benchmarks/results: no whitespace, floats to 6 significant digits (the reports show 4).

    python benchmarks/results_json.py benchmarks/results/*.json   # rewrite committed results in this form

heldout.py and refine.py write their JSON with `dumps`; `heldout.py --baselines` / `--merge` read it back as
before (the reused curves are the earlier run's to 6 significant digits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SIGNIFICANT_DIGITS = 6


def rounded(value: Any) -> Any:
    """``value`` with every float (in nested lists and dicts) rounded to `SIGNIFICANT_DIGITS` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def dumps(value: Any, default=None) -> str:
    """Compact JSON text of ``value`` (``default`` as in `json.dumps`, for objects JSON has no form for)."""
    return json.dumps(rounded(value), separators=(",", ":"), default=default)


def main(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        before = path.stat().st_size
        path.write_text(dumps(json.loads(path.read_text())))
        print(f"{path}: {before} -> {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
