"""files.atomic_save_safetensors: the same bytes as save_safetensors_bytes, written without holding them."""

import torch

from optbundle.files import atomic_save_safetensors, load_safetensors_file, save_safetensors_bytes


def test_atomic_save_safetensors_writes_the_canonical_bytes(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64),
               "g": torch.ones(5, dtype=torch.uint8)}
    for metadata in (None, {"format": "pt"}, {"z": "1", "kind": "x", "format": "pt"}):
        path = tmp_path / "t.safetensors"
        atomic_save_safetensors(path, tensors, metadata=metadata)
        assert path.read_bytes() == save_safetensors_bytes(tensors, metadata=metadata)
        loaded = load_safetensors_file(path)
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left behind
