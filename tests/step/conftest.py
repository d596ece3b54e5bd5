"""Fixtures of the step tests."""

import pytest

from optbundle import load_rule


@pytest.fixture(scope="module")
def default_rule():
    """The rule the fast back ends are checked with: they serve format-1 rules (format 2 runs on the reference)."""
    return load_rule("default-v2")
