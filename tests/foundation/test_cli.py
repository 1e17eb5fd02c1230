"""The `llmray` command: ls, one-line user errors with exit code 2 and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def llmray(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "llmray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_ls_lists_every_stage():
    from llmray.stages import STAGES

    r = llmray("ls")
    assert r.returncode == 0, r.stderr
    for name in STAGES:
        assert name in r.stdout


def test_stage_modules_are_the_registry():
    """One recipe module per registered stage, and no recipe outside the registry: `ls llmray/stages`
    is `llmray ls`. Each module has the `Config` and `run` the CLI and the pipeline call."""
    from llmray.stages import STAGES

    modules = {p.stem for p in (ROOT / "llmray" / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == {name.replace("-", "_") for name in STAGES}
    for stage in STAGES.values():
        assert callable(stage.run_fn()) and hasattr(stage.config_class(), "__dataclass_fields__"), stage.name
        assert (ROOT / stage.job).is_file(), stage.job


def test_unknown_stage_is_one_line_error():
    r = llmray("fly")
    assert r.returncode == 2
    assert "unknown stage 'fly'" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = llmray("corpus", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_bad_override_and_bad_key(tmp_path):
    r = llmray("corpus", "num_documents")
    assert r.returncode == 2 and "bad override 'num_documents'" in r.stderr
    r = llmray("corpus", "num_docs=5")
    assert r.returncode == 2 and "unknown key 'num_docs'" in r.stderr and "num_documents" in r.stderr


def test_corpus_stage_runs_and_skips_when_complete(tmp_path):
    out = tmp_path / "corpus"
    args = ("corpus", f"output={out}", "num_documents=50", "num_sft=5", "num_preference=5",
            "num_prompts=5", "num_eval=5")
    r = llmray(*args)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file() and (out / "docs" / "part-00000.jsonl").is_file()
    r = llmray(*args)
    assert r.returncode == 0 and '"skipped": true' in r.stdout


def test_flags_become_overrides():
    from llmray.cli import _flags_to_overrides

    assert _flags_to_overrides(["--from", "sft", "--until=ppo", "--keep-serving", "--model=/m"]) == [
        "from_stage=sft", "until_stage=ppo", "keep_serving=true", "model=/m"]


def test_pipeline_config_names_a_bad_sampled_k():
    from llmray.config import ConfigError, build
    from llmray.stages.pipeline import PipelineConfig

    assert build(PipelineConfig, {"sampled_k": 0}).sampled_k == 0
    with pytest.raises(ConfigError, match="sampled_k"):
        build(PipelineConfig, {"sampled_k": -1})
