"""Small fits with the Python/HF tooling: typed package, `inspect` of shipped rule names."""

import importlib.util
from pathlib import Path

from optbundle import load_rule
from optbundle.cli import main


def test_the_package_is_marked_typed():
    package = Path(importlib.util.find_spec("optbundle").submodule_search_locations[0])
    assert (package / "py.typed").is_file()
    assert '"optbundle" = ["py.typed"]' in (Path(__file__).parents[2] / "pyproject.toml").read_text()


def test_inspect_accepts_shipped_rule_names(capsys):
    assert main(["inspect", "default"]) == 0
    printed = capsys.readouterr().out
    assert load_rule("default").content_hash()[:16] in printed
    assert main(["inspect", "default-v2", "--json"]) == 0
    assert load_rule("default-v2").content_hash() in capsys.readouterr().out


def test_license_is_an_spdx_string_and_setuptools_does_not_warn(monkeypatch):
    """The TOML-table ``project.license`` made setuptools warn on every ``pip install -e .``."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), root / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message) for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"


def test_env_prints_versions_like_hf_env(capsys):
    import platform

    import torch
    import transformers

    import optbundle

    assert main(["env"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    info = dict(line[2:].split(": ", 1) for line in lines)
    assert info["optbundle version"] == optbundle.__version__
    assert info["Python version"] == platform.python_version()
    assert info["torch version"] == torch.__version__
    assert info["transformers version"] == transformers.__version__
    for name in ("peft", "accelerate", "huggingface_hub", "safetensors", "datasets"):
        assert info[f"{name} version"][0].isdigit(), info
    assert info["CUDA available"].startswith("yes" if torch.cuda.is_available() else "no")
    assert info["torch threads"] == str(torch.get_num_threads())
    assert "Platform" in info
    if importlib.util.find_spec("triton") is not None:
        assert "triton version" in info
    assert main(["env", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["optbundle version"] == optbundle.__version__
