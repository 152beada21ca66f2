"""The checkpoint format in one process (Horovod world of 1): the manifest, its checksums, what load_average
verifies, and the errors for directories that are not (or no longer) checkpoints. Multi-rank behaviour:
tests/integration/test_checkpoint.py."""

import hashlib
import json

import pytest
import torch
import horovod.torch as hvd

from horovod_dpsgd import checkpoint
from horovod_dpsgd.checkpoint import CheckpointError


@pytest.fixture(scope="module", autouse=True)
def one_learner():
    hvd.init()
    yield


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def test_the_manifest_names_each_file_with_its_size_and_sha256_and_later_saves_replace_earlier_ones(tmp_path):
    first = checkpoint.save(str(tmp_path), model(), extra={"epoch": 1})
    second = checkpoint.save(str(tmp_path), model(1), extra={"epoch": 2})
    assert first.endswith("learner-00000-of-00001.s000001.pt") and second.endswith(".s000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learner-00000-of-00001.s000002.pt", "manifest.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    data = (tmp_path / "learner-00000-of-00001.s000002.pt").read_bytes()
    assert manifest["files"] == [{"rank": 0, "name": "learner-00000-of-00001.s000002.pt", "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(), "step": None}]
    assert (manifest["size"], manifest["generation"], manifest["step"]) == (1, 2, None)
    state, extra = checkpoint.load_average(str(tmp_path))
    assert extra == {"epoch": 2} and torch.equal(state["weight"], model(1).weight)


def test_load_restores_the_model_and_returns_extra(tmp_path):
    checkpoint.save(str(tmp_path), model(3), extra={"epoch": 7})
    restored = model(0)
    assert checkpoint.load(str(tmp_path), restored) == {"epoch": 7}
    assert torch.equal(restored.weight, model(3).weight)


def test_load_average_verifies_the_files_it_reads(tmp_path):
    path = checkpoint.save(str(tmp_path), model())
    with open(path, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"learner-00000-of-00001.s000001.pt does not match its checksum"):
        checkpoint.load_average(str(tmp_path))


@pytest.mark.parametrize("manifest,words", [
    (None, "no checkpoint in"),
    ("{not json", "manifest.json is damaged"),
    (json.dumps({"format": 1, "size": 1, "files": []}), "format 1, expected 2"),
    (json.dumps({"format": 2, "size": 2, "generation": 1, "step": 0, "files": []}), "lists 0 files for 2 learners"),
])
def test_a_missing_or_damaged_manifest_is_named(tmp_path, manifest, words):
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=words):
        checkpoint.load(str(tmp_path), model())


def test_files_without_a_manifest_are_not_loaded_unverified(tmp_path):
    torch.save({"model": model().state_dict()}, tmp_path / "learner-00000-of-00001.pt")  # horovod-dpsgd 0.2's format
    with pytest.raises(CheckpointError, match=r"holds learner files but no manifest.json.*carry no checksums"):
        checkpoint.load(str(tmp_path), model())


def test_a_checkpoint_saved_without_optimizer_state_says_so(tmp_path):
    checkpoint.save(str(tmp_path), model())
    opt = torch.optim.SGD(model().parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="saved without optimizer state; pass optimizer=None"):
        checkpoint.load(str(tmp_path), model(), opt)


def test_a_checkpoint_of_another_model_is_refused_before_the_rng_is_touched(tmp_path):
    checkpoint.save(str(tmp_path), model())
    other = torch.nn.Linear(5, 3)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="does not fit this model or optimizer"):
        checkpoint.load(str(tmp_path), other)
    assert torch.equal(torch.get_rng_state(), rng)
