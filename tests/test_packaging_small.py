"""Small fits with the Python/HF tooling: typed package, `inspect` of shipped rule names."""

import importlib.util
from pathlib import Path

from optbundle import load_rule
from optbundle.cli import main


def test_the_package_is_marked_typed():
    package = Path(importlib.util.find_spec("optbundle").submodule_search_locations[0])
    assert (package / "py.typed").is_file()
    assert '"optbundle" = ["py.typed"]' in (Path(__file__).parents[1] / "pyproject.toml").read_text()


def test_inspect_accepts_shipped_rule_names(capsys):
    assert main(["inspect", "default"]) == 0
    printed = capsys.readouterr().out
    assert load_rule("default").content_hash()[:16] in printed
    assert main(["inspect", "default-v2", "--json"]) == 0
    assert load_rule("default-v2").content_hash() in capsys.readouterr().out
