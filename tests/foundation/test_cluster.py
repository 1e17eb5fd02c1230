"""Ray bootstrap: a local cluster on 127.0.0.1 only; missing resources fail naming them."""

import pytest


def test_local_cluster_on_loopback(ray_cluster):
    import ray

    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert ray.cluster_resources()["CPU"] >= 2
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")

    @ray.remote
    def where():
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote()) == "127.0.0.1"


def test_missing_resource_is_named(ray_cluster):
    from llmray.cluster import require_resources

    with pytest.raises(RuntimeError, match=r"pretrain needs GPU=2 but the cluster has GPU=0"):
        require_resources({"GPU": 2}, "pretrain", timeout_s=0.5)


def test_worker_env_selects_cpu_accelerator():
    from llmray.cluster import worker_env

    env = worker_env({"X": "1"})
    assert env["DS_ACCELERATOR"] == "cpu" and env["X"] == "1"
