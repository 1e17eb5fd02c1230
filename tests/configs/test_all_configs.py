"""Every shipped YAML loads: stage configs through the stage registry, Serve app configs through
Ray Serve's own schema with import paths that resolve.

The lists are collected when the module is imported, so a config added by any stage is tested
without editing this file; a YAML that does not load fails with the key or file it names.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from llmray import config as cfglib
from llmray import stages

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "jobs" / "configs"
SERVING = ROOT / "serving"


def _stage_yamls() -> list[tuple[str, Path]]:
    out = []
    for stage in stages.STAGES.values():
        for path in sorted((ROOT / stage.config_dir).glob("*.y*ml")):
            out.append((stage.name, path))
    return out


STAGE_YAMLS = _stage_yamls()
SERVE_YAMLS = sorted(SERVING.glob("*.y*ml")) if SERVING.is_dir() else []


@pytest.mark.parametrize(
    "stage_name,path", STAGE_YAMLS, ids=[str(p.relative_to(ROOT)) for _, p in STAGE_YAMLS]
)
def test_stage_config_loads(stage_name: str, path: Path):
    stage = stages.get(stage_name)
    try:
        cls = stage.config_class()
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{path.relative_to(ROOT)}: stage {stage_name!r} config class ({stage.module}.Config) "
                    f"does not import ({e}); a shipped YAML must load")
    cfg = cfglib.load(cls, path)
    assert isinstance(cfg, cls)
    # Round trip: the loaded config, written back out as plain data, loads to the same values.
    assert cfglib.to_dict(cfglib.build(cls, cfglib.to_dict(cfg))) == cfglib.to_dict(cfg)


def test_shipped_configs_exist_for_the_stages_we_own():
    names = {n for n, _ in STAGE_YAMLS}
    assert {"corpus", "tokenizer"} <= names


def test_config_dirs_belong_to_stages_with_job_scripts():
    """jobs/configs/<dir> must be a registered stage's dir, and that stage must have its job script."""
    by_dir = {Path(s.config_dir).name: s for s in stages.STAGES.values()}
    problems = []
    for d in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        stage = by_dir.get(d.name)
        if stage is None:
            problems.append(f"jobs/configs/{d.name}/ matches no stage (stages: {', '.join(by_dir)})")
        elif list(d.glob("*.y*ml")) and not (ROOT / stage.job).is_file():
            problems.append(f"jobs/configs/{d.name}/ has configs but {stage.job} is missing")
    assert not problems, "\n".join(problems)


def test_job_scripts_are_registered_stages():
    known = {s.job for s in stages.STAGES.values()}
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jobs").glob("*.py"))
    stray = [s for s in scripts if s not in known]
    assert not stray, f"job scripts that are not registered stages: {stray}"
    for script in scripts:
        text = (ROOT / script).read_text()
        stage = next(s for s in stages.STAGES.values() if s.job == script)
        assert f'job_main("{stage.name}")' in text, f"{script} must call job_main({stage.name!r})"
        assert "ray job submit" in text.split('"""')[1], f"{script}: docstring must say how to submit it"


def test_a_bad_key_names_the_key_and_a_missing_file_names_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_documents: 10\nnum_docs: 5\n")
    from llmray.data.synthetic import CorpusConfig

    with pytest.raises(cfglib.ConfigError, match="num_docs"):
        cfglib.load(CorpusConfig, bad)
    with pytest.raises(cfglib.ConfigError, match="config file not found: .*nope.yaml"):
        cfglib.load(CorpusConfig, tmp_path / "nope.yaml")


# --- serving/*.yaml: Serve application configs (`serve run` / `serve deploy`) ------------------

@pytest.mark.parametrize("path", SERVE_YAMLS, ids=[p.name for p in SERVE_YAMLS])
def test_serve_app_config_is_valid(path: Path):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data.get("applications"), f"{path.name}: needs `applications:`"
    schema = ServeDeploySchema.model_validate(data)
    prefixes = [a.route_prefix for a in schema.applications]
    assert len(prefixes) == len(set(prefixes)), f"{path.name}: duplicate route_prefix {prefixes}"
    for app in schema.applications:
        module, _, attr = app.import_path.replace(":", ".").rpartition(".")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{path.name}: application {app.name!r} import_path {app.import_path!r}: {e}")
        assert hasattr(mod, attr), f"{path.name}: {module} has no {attr!r} (import_path of {app.name!r})"
        wd = (app.runtime_env or {}).get("working_dir")
        if wd and "://" not in wd:
            assert (path.parent / wd).resolve().is_dir() or (ROOT / wd).is_dir(), \
                f"{path.name}: working_dir {wd} missing"
