"""The DeepSpeed engine binds to the device this worker computes on (llmray.device), not cuda:LOCAL_RANK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, torch
import llmray.device
# Mock, because CUDA cannot run here: the worker's device is cuda:5 (e.g. Ray Train's index of its GPU).
llmray.device.worker_device = lambda: torch.device("cuda", 5)
from llmray.models.factory import ModelConfig, build_model
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig
from llmray.train.engine import _device_args, build_deepspeed_engine
from llmray.train.loop import to_batch
assert _device_args().device_rank == 5
llmray.device.worker_device = lambda: torch.device("cpu")
assert _device_args() is None  # the CPU path passes nothing: DeepSpeed as before
llmray.device.worker_device = lambda: torch.device("cuda", 5)
model = build_model(ModelConfig(preset="tiny", vocab_size=256), seed=0)
engine = build_deepspeed_engine(model, DeepSpeedConfig(zero_stage=1, micro_batch_size=2), OptimizerConfig(), 2)
import numpy as np
batch = to_batch({"input_ids": np.random.default_rng(0).integers(0, 256, (2, 16))}, engine.device)
loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
engine.backward(loss); engine.step()
print("OK", engine.device, os.environ["LOCAL_RANK"], float(loss))
"""


@pytest.mark.slow  # builds a DeepSpeed engine (a few seconds once its ops are compiled)
def test_engine_takes_the_worker_device_with_local_rank_left_to_ray():
    """`deepspeed.initialize(args=...)` accepts our device_rank (5, while LOCAL_RANK is 3: Ray's local
    rank) and trains a step; on the CPU accelerator the index selects nothing, which is why CUDA is mocked."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[:3] == ["OK", "cpu", "3"] and 0 < float(last[3]) < 10
