"""Trainer checkpoints that resume after a kill: skip the half-written newest one.

Trainer writes ``checkpoint-N/`` file by file (model, optimizer, scheduler, RNG states) and ``trainer_state.json``
last; a kill -9 in between leaves a folder that ``resume_from_checkpoint=True`` still picks (it takes the highest
``N``), and the resume then fails. A checkpoint is complete when its ``trainer_state.json`` parses and names step
``N``: everything written before it is then on disk. `ResumableCheckpointsCallback` moves incomplete ones aside
(to ``.incomplete-checkpoint-N-<time>``, which Trainer's pattern does not match) when the Trainer is built, so
``trainer.train(resume_from_checkpoint=True)`` resumes from the newest complete one::

    trainer = Trainer(..., callbacks=[ResumableCheckpointsCallback()])
    trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def is_complete_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` (``checkpoint-N``) was fully written: its ``trainer_state.json`` (written last) parses
    and records ``global_step`` N."""
    folder = Path(folder)
    match = _CHECKPOINT.match(folder.name)
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(match) and isinstance(state, dict) and state.get("global_step") == int(match.group(1))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``output_dir`` (None if there is none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def set_aside_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Rename every incomplete ``checkpoint-N`` under ``output_dir`` to ``.incomplete-checkpoint-N-<time>``;
    returns the new paths."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    moved = []
    for path in sorted(output_dir.iterdir()):
        if _CHECKPOINT.match(path.name) and path.is_dir() and not is_complete_checkpoint(path):
            aside = output_dir / f".incomplete-{path.name}-{int(time.time())}"
            os.replace(path, aside)
            logger.warning("%s was not fully written (killed while saving?); moved to %s", path, aside.name)
            moved.append(aside)
    return moved


class ResumableCheckpointsCallback(TrainerCallback):
    """When the Trainer is built, set aside checkpoints a kill left half-written (`set_aside_incomplete_checkpoints`)
    so that ``resume_from_checkpoint=True`` resumes from the newest complete one. Only the main process renames."""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if getattr(args, "should_save", True) and args.output_dir:
            set_aside_incomplete_checkpoints(args.output_dir)
        return control
