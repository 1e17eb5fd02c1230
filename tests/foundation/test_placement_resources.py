"""Custom Ray resources per worker (`<role>.resources`, `scaling.resources`): validated with the key
named, and carried into what each worker requests (RL role bundles, Ray Train's resources_per_worker).
Pure: no Ray. The two-node runs in tests/ops/test_multinode.py place real workers with them."""

from __future__ import annotations

import pytest

from llmray.config import ConfigError, load
from llmray.rl.config import RLConfig
from llmray.placement import shared_bundle
from llmray.rl.groups import _res
from llmray.stages.pretrain import PretrainConfig
from llmray.train.trainer import worker_resources


def test_rl_role_resources_reach_the_worker_bundle():
    cfg = load(RLConfig, None, ["rollout.resources={node_b: 1}", "actor.resources={node_a: 1, fast_disk: 0.5}",
                                "actor.gpus_per_worker=0.5"])
    assert _res(cfg.rollout) == {"CPU": 1.0, "node_b": 1}
    assert _res(cfg.actor) == {"CPU": 1.0, "GPU": 0.5, "node_a": 1, "fast_disk": 0.5}
    assert _res(cfg.ref) == {"CPU": 0.5}  # none asked: CPU only, as before
    # Colocated (placement.colocate_actor_ref): one bundle holds both workers' resources.
    assert shared_bundle(_res(cfg.actor), _res(cfg.ref)) == {"CPU": 1.5, "GPU": 0.5, "node_a": 1, "fast_disk": 0.5}


def test_train_workers_ask_ray_train_for_their_resources():
    sc = load(PretrainConfig, None, ["scaling.resources={train_slot: 1}"]).scaling
    assert worker_resources(sc) == {"CPU": 1.0, "train_slot": 1}
    gpu = load(PretrainConfig, None, ["scaling.use_gpu=true", "scaling.cpus_per_worker=4"]).scaling
    assert worker_resources(gpu) == {"CPU": 4.0, "GPU": 1.0}


@pytest.mark.parametrize("override, message", [
    ("rollout.resources={node_b: 0}", r"rollout\.resources\.node_b: must be > 0, got 0"),
    ("critic.resources={GPU: 1}", r"critic\.resources\.GPU: set CPUs/GPUs with cpus_per_worker"),
    ("reward.resources={'': 1}", r"reward\.resources: resource names must be non-empty"),
    ("ref.resources=[node_a]", r"ref\.resources"),
])
def test_bad_rl_resources_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load(RLConfig, None, [override])


def test_bad_scaling_resources_name_the_key():
    with pytest.raises(ConfigError, match=r"scaling\.resources\.CPU: set CPUs/GPUs"):
        load(PretrainConfig, None, ["scaling.resources={CPU: 2}"])
    with pytest.raises(ConfigError, match=r"scaling\.resources\.train_slot: must be > 0, got -1"):
        load(PretrainConfig, None, ["scaling.resources={train_slot: -1}"])
