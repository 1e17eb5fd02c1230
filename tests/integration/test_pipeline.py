"""The main job end to end on the `tiny` preset, and a kill mid-stage followed by a resuming re-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmray import artifacts

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "jobs" / "configs" / "pipeline" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_cluster):
    """One full pipeline run on the tiny preset, in this process, on the session Ray cluster."""
    from llmray.cli import run_stage

    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_stage("pipeline", str(TINY), [f"workdir={workdir}"])
    return workdir, result


def test_every_artifact_report_and_answers(tiny_run):
    from llmray.stages.pipeline import STEPS

    workdir, result = tiny_run
    for name, _, sub, kind in STEPS:
        if kind:
            assert artifacts.is_complete(workdir / sub, kind), f"{name} artifact incomplete"
    report = workdir / "report"
    text = (report / "report.md").read_text()
    assert (report / "report.html").is_file()
    pngs = list(report.glob("*.png"))
    assert len(pngs) >= 3 and all(f"({p.name})" in text for p in pngs)
    answers = result["answers"]
    assert len(answers) == 3 and all(a["answer"] for a in answers)
    assert set(result["stage_seconds"]) >= {"corpus", "pretrain", "serve"}
    results = json.loads((workdir / "results.json").read_text())
    # Held-out perplexity falls from the pretrained model's level after training on the grammar.
    assert results["pretrain"]["heldout_ppl"] < 1024  # below a uniform guess over the vocabulary
    # SFT mixes pretraining text into its rows: it keeps the language model it starts from.
    assert results["sft"]["heldout_ppl"] <= 2 * results["pretrain"]["heldout_ppl"], results["sft"]
    assert results["sft"]["general_rows"] > 0
    # The RL stage scored the held-out prompts on its own vLLM engines; the pipeline added perplexity.
    ppo = results["ppo"]
    assert ppo["task_accuracy"] == round(ppo["eval_accuracy"][-1][1], 4) and ppo["heldout_ppl"] > 0
    assert 0.0 <= ppo["sampled_accuracy"] <= ppo["sampled_pass_at_k"] <= 1.0
    # The default RL loop: PPO with five roles in five processes (the reward worker adds the reward
    # model's score to the task rule).
    pids = json.loads((workdir / "runs" / "ppo" / "workers.json").read_text())
    assert set(pids) == {"rollout", "actor", "critic", "ref", "reward"}
    assert len({p for ps in pids.values() for p in ps}) == 5
    assert results["clean-dedup"], "clean-dedup reported nothing"
    # train -> quantize -> draft -> serve: W8A8 from llm-compressor, measured on the vLLM engine and
    # published; the draft gate's decision (draft, n-gram or none) is what the endpoint serves with.
    q = results["quantize"]
    assert q["schemes"]["w8a8"]["published"] and q["measured_on"] == "vllm" and q["ppl_increase"] <= 0.5
    assert q["heldout_ppl"] == pytest.approx(q["schemes"]["w8a8"]["ppl"], rel=1e-3) and "Quantization gate" in text
    spec = artifacts.read_manifest(workdir / "draft").metrics["speculative"]
    assert results["serve"]["speculative"] == (spec["method"] or "none")



def test_served_model_is_the_trained_one(tiny_run):
    """The eval stage on the live endpoint (llmray.stages.eval): served greedy answers equal the offline
    engine's on the same directory, and lm-eval's generation task agrees with the served accuracy."""
    import yaml

    workdir, _ = tiny_run
    tiny = yaml.safe_load(TINY.read_text())
    serve = json.loads((workdir / "results.json").read_text())["serve"]
    n = tiny["eval_prompts"]
    assert serve["served_n"] == n and abs(serve["served_accuracy"] - serve["offline_accuracy"]) <= 0.03
    assert serve["served_offline_same_answers"] >= 0.95 and serve["served_matches_offline"] is True
    lm = serve["lm_eval"]
    assert lm["llmray_arith"]["n"] == n and lm["llmray_arith_mc"]["n"] == n
    assert lm["llmray_arith"]["exact_match"] == pytest.approx(serve["served_accuracy"], abs=1 / n + 1e-9)
    assert lm["llmray_heldout"]["n"] == tiny["heldout_documents"] and lm["llmray_heldout"]["bits_per_byte"] > 0.5


def test_rerun_skips_completed_stages(tiny_run):
    workdir, _ = tiny_run
    r = _pipeline(workdir, "--until", "pack")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("corpus", "clean-dedup", "tokenizer", "pack"):
        assert f"{name}: done already, skipped" in r.stdout


def test_killed_mid_stage_resumes_without_redoing(tiny_run, tmp_path):
    """Kill the pipeline while pretraining (after its first complete checkpoint); the re-run skips
    the finished data stages and pretraining resumes from the checkpoint to the full step count.
    The work directory is given relative to the current one, as a user types it."""
    from llmray.train.checkpoint import find_latest

    src, _ = tiny_run
    work = tmp_path / "run"
    work.mkdir()
    for sub in ("corpus", "clean", "tokenizer", "packed"):
        shutil.copytree(src / sub, work / sub)
    args = ("--until", "pretrain", "pretrain.max_steps=20", "pretrain.checkpoint.every_n_steps=5")
    proc = subprocess.Popen(_cmd(Path("run"), *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=_env())
    ckpts = work / "runs" / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if find_latest(ckpts) is not None:
                break
            time.sleep(1)
        assert proc.poll() is None, "pipeline ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not artifacts.is_complete(work / "pretrain")
    r = _pipeline(Path("run"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("clean-dedup", "tokenizer", "pack"):
        assert f"{name}: done already, skipped" in r.stdout
    assert artifacts.is_complete(work / "pretrain", "model")
    steps = [json.loads(line)["step"] for line in (work / "runs" / "pretrain" / "metrics.jsonl").open()]
    assert max(steps) == 20
    out = r.stdout + r.stderr
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 5, "pretraining started over instead of resuming"
    # Readable output: each step line once (Ray Train's print patch doubled them), and none of the
    # placement-group cleaner's once-a-second State API warnings (no dashboard on a local cluster).
    assert out.count("[llmray] step 20/20 ") == 1, out[-3000:]
    assert "Failed to query Ray Train Controller" not in out


def test_bad_input_is_named(tmp_path):
    r = _pipeline(tmp_path, "corpus_path=/no/such/corpus")
    assert r.returncode == 2 and "corpus_path does not exist: /no/such/corpus" in r.stderr
    r = _pipeline(tmp_path, "--from", "nosuchstage")
    assert r.returncode == 2 and "unknown stage 'nosuchstage'" in r.stderr
    r = _pipeline(tmp_path, "--from", "sft")
    assert r.returncode == 2 and "the corpus artifact it needs is missing" in r.stderr
    r = _pipeline(tmp_path, "pretrain.optimizer.lrr=1")
    assert r.returncode == 2 and "unknown key 'pretrain.optimizer.lrr'" in r.stderr


def _cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "llmray.cli", "pipeline", "--config", str(TINY), f"workdir={workdir}", *args]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _pipeline(workdir: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(workdir, *args), cwd=cwd, capture_output=True, text=True, timeout=900, env=_env())
