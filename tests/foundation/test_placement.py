"""The placement plan on a described cluster (no Ray, no GPUs): RL roles on 2 nodes x 8 GPUs, colocated
and separate; local ranks and devices; layouts that do not fit name the key to change."""

from __future__ import annotations

import pytest

from llmray.config import build
from llmray.placement import Group, Node, PlanError, Role, local_ranks, place
from llmray.rl.config import RLConfig
from llmray.rl.groups import _res, placement_groups

NODES = [Node(f"node{i}", cpus=96, gpus=8, gpu_memory_gb=80) for i in range(2)]


def rl(**sections) -> RLConfig:
    base = {"algo": {"algorithm": "ppo", "prompts_per_step": 16, "n_samples": 4, "minibatch_size": 16}}
    return build(RLConfig, {**base, **sections})


def gpu_roles(n: int, colocate: bool) -> RLConfig:
    trainer = {"num_workers": n, "cpus_per_worker": 4, "gpus_per_worker": 0.75 if colocate else 1}
    frozen = {"num_workers": n, "cpus_per_worker": 2, "gpus_per_worker": 0.25 if colocate else 1}
    return rl(rollout={"num_workers": 4, "cpus_per_worker": 4, "gpus_per_worker": 1}, actor=trainer, critic=trainer,
              ref=frozen, reward={**frozen, "kind": "rule"},
              placement={"colocate_actor_ref": colocate, "colocate_critic_reward": colocate})


def by(slots, role):
    return [s for s in slots if s.role == role]


def test_local_ranks_count_per_node_in_rank_order():
    assert local_ranks(["a", "b", "a", "a"]) == [(0, 3), (0, 1), (1, 3), (2, 3)]
    assert local_ranks([]) == []


def test_colocated_layout_on_two_nodes_of_eight_gpus():
    slots = place(placement_groups(gpu_roles(4, colocate=True)), NODES)
    rollout, actor, ref = by(slots, "rollout"), by(slots, "actor"), by(slots, "ref")
    assert [(s.node, s.gpu_ids, s.local_rank, s.device) for s in rollout] == [
        ("node0", (i,), i, "cuda:0") for i in range(4)]
    # actor and ref share each rank's bundle: the same physical GPU, 0.75 + 0.25 of it
    assert [s.gpu_ids for s in actor] == [s.gpu_ids for s in ref] == [(4,), (5,), (6,), (7,)]
    assert {s.node for s in actor} == {"node0"} and [s.local_rank for s in actor] == [0, 1, 2, 3]
    assert {s.device for s in actor + ref} == {"cuda:0"}  # each actor sees only its own GPU
    critic, reward = by(slots, "critic"), by(slots, "reward")
    assert {s.node for s in critic + reward} == {"node1"} and [s.gpu_ids for s in critic] == [s.gpu_ids for s in reward]
    assert [s.local_world_size for s in critic] == [4] * 4


def test_separate_layout_spreads_over_the_second_node():
    slots = place(placement_groups(gpu_roles(2, colocate=False)), NODES)
    # 4 rollout + 2 actor + 2 critic fill node0's 8 GPUs; ref and reward go to node1
    assert {s.node for s in slots if s.role in ("rollout", "actor", "critic")} == {"node0"}
    assert {s.node for s in by(slots, "ref") + by(slots, "reward")} == {"node1"}
    gpus = [(s.node, g) for s in slots for g in s.gpu_ids]
    assert len(gpus) == len(set(gpus)) == 12  # no GPU handed out twice
    assert [s.local_rank for s in by(slots, "ref")] == [0, 1]


def test_a_group_split_across_nodes_gets_local_ranks_per_node():
    slots = place([Group((Role("actor", 12, {"CPU": 1, "GPU": 1}, "actor"),))], NODES)
    assert [s.node for s in slots] == ["node0"] * 8 + ["node1"] * 4
    assert [s.local_rank for s in slots] == list(range(8)) + list(range(4))
    assert [s.local_world_size for s in slots] == [8] * 8 + [4] * 4


def test_ray_train_workers_see_every_gpu_of_their_node():
    slots = place([Group((Role("train", 16, {"CPU": 8, "GPU": 1}, "scaling"),), ray_train=True)], NODES)
    assert [s.device for s in slots] == [f"cuda:{i}" for i in range(8)] * 2


def test_layouts_that_do_not_fit_name_the_key():
    with pytest.raises(PlanError, match=r"^rollout\.gpus_per_worker: .*GPU=2.*largest node has GPU=1"):
        place(placement_groups(rl(rollout={"gpus_per_worker": 2})), [Node("n", cpus=64, gpus=1, gpu_memory_gb=24)])
    too_many = gpu_roles(4, colocate=True)
    with pytest.raises(PlanError, match=r"^critic\.num_workers: critic\+reward worker 0 of 4"):
        place(placement_groups(too_many), NODES[:1])
    with pytest.raises(PlanError, match=r"^rollout\.num_workers: rollout worker 8 of 9"):
        place(placement_groups(rl(algo={"algorithm": "grpo", "prompts_per_step": 9, "n_samples": 4,
                                        "minibatch_size": 36},
                                  rollout={"num_workers": 9, "gpus_per_worker": 1})), NODES[:1])
    with pytest.raises(PlanError, match=r"^actor\.cpus_per_worker: .*actor\+ref in one bundle"):
        place(placement_groups(rl(actor={"cpus_per_worker": 60}, ref={"cpus_per_worker": 40},
                                  placement={"colocate_actor_ref": True})), NODES)


def test_plan_bundles_are_the_ones_the_role_groups_ask_ray_for():
    cfg = gpu_roles(4, colocate=True)
    groups = {g.name: g for g in placement_groups(cfg)}
    assert set(groups) == {"rollout", "actor+ref", "critic+reward"}
    assert groups["rollout"].bundles() == [_res(cfg.rollout)] * 4
    # RoleGroups._trainer_placement's shared bundle: the actor's and the ref's resources added up
    assert groups["actor+ref"].bundles()[0] == {"CPU": 6.0, "GPU": 1.0}
    separate = {g.name for g in placement_groups(gpu_roles(2, colocate=False))}
    assert separate == {"rollout", "actor", "critic", "ref", "reward"}
    grpo = {g.name for g in placement_groups(rl(algo={"algorithm": "grpo", "prompts_per_step": 4, "n_samples": 4,
                                                       "minibatch_size": 16}))}
    assert "critic" not in grpo


def test_custom_resources_pin_workers_to_the_nodes_that_offer_them():
    """`<role>.resources` (a node label such as node_b) goes into the bundle; only nodes offering it take it."""
    nodes = [Node("a", cpus=8), Node("b", cpus=8, resources={"node_b": 4})]
    slots = place([Group((Role("rollout", 2, {"CPU": 1, "node_b": 1}, "rollout"),)),
                   Group((Role("actor", 2, {"CPU": 1}, "actor"),))], nodes)
    assert [s.node for s in slots if s.role == "rollout"] == ["b", "b"]
    assert [s.node for s in slots if s.role == "actor"] == ["a", "a"]
    with pytest.raises(PlanError, match=r"^rollout\.resources\.node_c: .*needs node_c=1 but the largest node has "
                                        r"node_c=0"):
        place([Group((Role("rollout", 1, {"CPU": 1, "node_c": 1}, "rollout"),))], nodes)
