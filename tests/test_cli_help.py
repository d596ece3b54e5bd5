"""Every subcommand answers ``--help`` through ``python -m optbundle.cli`` and through the ``optbundle`` script
(the module's ``__main__`` block once ran before ``finetune``/``refine`` were registered)."""

import subprocess
import sys
from pathlib import Path

import pytest

from optbundle.cli import SUBCOMMANDS

SCRIPT = Path(sys.executable).with_name("optbundle")


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
@pytest.mark.parametrize("entry", ["module", "script"])
def test_every_subcommand_has_help(name, entry):
    command = [sys.executable, "-m", "optbundle.cli"] if entry == "module" else [str(SCRIPT)]
    if entry == "script" and not SCRIPT.exists():
        pytest.skip("the optbundle console script is not installed in this environment")
    result = subprocess.run([*command, name, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: optbundle {name} "), result.stdout[:200]


def test_every_subcommand_is_registered():
    assert {"push", "pull", "inspect", "env", "finetune", "refine"} <= set(SUBCOMMANDS)
