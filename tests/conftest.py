"""Session fixtures: one real local Ray cluster on loopback, one tokenizer, one tiny model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own cluster, never a user's


# Fixtures that start a Ray cluster, a server, a vLLM engine or a training run. A test that needs
# none of them, and is not marked `slow`, is in the fast tier (`make test-fast`: pure functions,
# configs, small files), which the full suite includes.
HEAVY_FIXTURES = frozenset({
    "ray_cluster", "two_node_cluster", "server", "test_server", "packed_dataset", "data_corpus",
    "clean_reference", "tiny_run", "rl_sft_model", "rl_fixed_prompts", "quantized", "engine",
    "group", "hf_group", "hf_models", "jobs", "runtime_env", "client", "probes", "other_model_dir", "draft_run",
})


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if not HEAVY_FIXTURES & set(item.fixturenames) and "slow" not in item.keywords and "gpu" not in item.keywords:
            item.add_marker(pytest.mark.fast)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster bound to 127.0.0.1, shared by the whole session."""
    import ray

    from llmray.cluster import RayConfig, init_ray, shutdown_ray

    # Retried: on a loaded machine the raylet can miss Ray's fixed 30 s registration window
    # ("node timed out during startup"), and one failed start would error every Ray test.
    for attempt in range(4):
        try:
            resources = init_ray(RayConfig(num_cpus=4, object_store_memory_gb=2.0))
            break
        except Exception:
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 3:
                raise
    yield resources
    shutdown_ray()


def sample_texts(n: int = 3000, seed: int = 0) -> list[str]:
    """Documents and task prompts/answers to train a test tokenizer on."""
    from llmray.data import synthetic, tasks

    rng = random.Random(seed)
    docs = [synthetic.document(rng) for _ in range(n)]
    chats = []
    for _ in range(n // 3):
        t = tasks.make_task(rng)
        chats.append(t.prompt + " " + t.gold_response())
    return docs + chats


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(sample_texts(), vocab_size=1024), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """An untrained `tiny` model saved as a Hugging Face directory with its tokenizer."""
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(build_model(ModelConfig(preset="tiny"), tok, seed=0), tok, out)
    return out
