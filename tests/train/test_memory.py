"""The pre-launch memory estimate against the peak memory measured on a real DeepSpeed engine (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r'''
import json, os, resource, sys, torch
from llmray.models.factory import ModelConfig, build_model
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig
from llmray.train.engine import build_deepspeed_engine, init_distributed
from llmray.train.lm import token_loss_sum
from llmray.train.loop import rss_gb, peak_rss_gb
a = json.loads(sys.argv[1])
torch.set_num_threads(1)
init_distributed("gloo")
import deepspeed  # imported and initialised before the baseline: only training memory is compared
from transformers import LlamaConfig, LlamaForCausalLM  # the import alone is ~0.2 GB of RSS
base = rss_gb()
ds = DeepSpeedConfig(**a["ds"])
model = build_model(ModelConfig(**a["model"]), None, seed=0)
engine = build_deepspeed_engine(model, ds, OptimizerConfig(lr=1e-4), total_steps=10)
x = torch.randint(0, a["model"]["vocab_size"], (ds.micro_batch_size, a["seq_len"]))
for _ in range(3):
    s, n = token_loss_sum(engine(input_ids=x, use_cache=False).logits, x)
    engine.backward(s / n); engine.step()
print("RESULT" + json.dumps({"base_gb": base, "peak_gb": peak_rss_gb()}))
'''


MODEL = {"preset": "custom", "hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
         "vocab_size": 8192, "max_position_embeddings": 512}
SEQ_LEN = 256
CASES = {
    "ds0": {"zero_stage": 1, "micro_batch_size": 4},
    "ds1": {"zero_stage": 1, "micro_batch_size": 4, "activation_checkpointing": True},
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's probe at once, each its own 1-thread process: peak RSS is per process, so running
    them side by side on two cores changes no measurement and halves the wait."""
    import os

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, ds in CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", PROBE, json.dumps({"ds": ds, "model": MODEL, "seq_len": SEQ_LEN})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_close_to_measured_peak(name, probes):
    from llmray.models.factory import ModelConfig
    from llmray.train.deepspeed_config import DeepSpeedConfig
    from llmray.train.memory import estimate

    ds = CASES[name]
    est = estimate(ModelConfig(**MODEL).resolved(), DeepSpeedConfig(**ds), SEQ_LEN, num_workers=1)
    p = probes[name]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert line, p.stderr[-3000:]
    r = json.loads(line[0][6:])
    measured = r["peak_gb"] - r["base_gb"]
    predicted = est.states_and_activations_gb()
    print(f"estimate {predicted:.3f} GB ({est.summary()}), measured peak above baseline {measured:.3f} GB")
    assert 0.5 < measured / predicted < 2.0, (measured, predicted)
