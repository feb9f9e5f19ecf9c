"""The swarm identifies a model by what it is: config and checkpoint layout, plus sampled bytes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import ModelNotFound
from shared.models.fingerprint import model_fingerprint


def test_the_same_model_anywhere_has_one_fingerprint(tiny_dir, tmp_path):
    original = tiny_dir("llama")
    copy = shutil.copytree(original, tmp_path / "elsewhere" / "renamed")
    assert model_fingerprint(copy) == model_fingerprint(original)
    # sharded or single-file: the same tensors
    assert model_fingerprint(tiny_dir("llama", sharded=True)) == model_fingerprint(original)
    # bookkeeping keys of the config do not count
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "9.9.9"
    config["_name_or_path"] = "/somewhere/else"
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert model_fingerprint(copy) == model_fingerprint(original)


def test_a_different_model_never_shares_it(tiny_dir, tmp_path):
    original = tiny_dir("llama")
    assert model_fingerprint(tiny_dir("mistral")) != model_fingerprint(original)
    # same config, same layout, one layer's weights changed (a fine-tune of the same base)
    tuned = shutil.copytree(original, tmp_path / "llama")
    tensors = load_file(tuned / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(tuned) != model_fingerprint(original)
    # a config that computes something else
    other = shutil.copytree(original, tmp_path / "eps" / "llama")
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(other) != model_fingerprint(original)


def test_index_files_cannot_point_outside_the_model(tiny_dir, tmp_path):
    bad = shutil.copytree(tiny_dir("llama", sharded=True), tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFound, match="outside the model directory"):
        model_fingerprint(bad)
