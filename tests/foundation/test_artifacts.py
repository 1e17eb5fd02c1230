"""Artifacts: manifest written last; an interrupted write is never taken for a complete one."""

import json

import pytest

from llmray import artifacts


def test_publish_then_complete(tmp_path):
    dest = tmp_path / "ds"
    with artifacts.publish(dest) as tmp:
        (tmp / "data.txt").write_text("x")
        artifacts.write_manifest(tmp, "dataset", "test", {"a": 1}, {"rows": 1})
    assert artifacts.is_complete(dest, "dataset")
    assert artifacts.require(dest, "dataset").metrics == {"rows": 1}
    with pytest.raises(artifacts.ArtifactError, match="is a dataset artifact, expected model"):
        artifacts.require(dest, "model")


def test_interrupted_write_is_not_complete(tmp_path):
    dest = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="crash"):
        with artifacts.publish(dest) as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("crash")
    assert not dest.exists()
    assert not any(p.name.startswith(".ds.tmp") for p in tmp_path.iterdir())


def test_half_written_dir_without_manifest(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "weights.bin").write_text("partial")
    assert not artifacts.is_complete(dest)
    with pytest.raises(artifacts.ArtifactError, match="not a complete artifact"):
        artifacts.require(dest, "checkpoint")
    assert artifacts.clear_incomplete(dest) and not dest.exists()


def test_corrupt_manifest_is_incomplete(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert not artifacts.is_complete(tmp_path)


def test_publish_replaces_old_and_records_inputs(tmp_path):
    src = tmp_path / "src"
    with artifacts.publish(src) as tmp:
        artifacts.write_manifest(tmp, "corpus", "test")
    dest = tmp_path / "out"
    for version in (1, 2):
        with artifacts.publish(dest) as tmp:
            (tmp / "v").write_text(str(version))
            artifacts.write_manifest(tmp, "dataset", "test", inputs=[src])
    assert (dest / "v").read_text() == "2"
    m = json.loads((dest / "manifest.json").read_text())
    assert m["inputs"] == {str(src): artifacts.manifest_hash(src)}


def test_publish_without_manifest_fails(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="without a manifest"):
        with artifacts.publish(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()
