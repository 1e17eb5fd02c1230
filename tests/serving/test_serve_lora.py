"""A LoRA adapter from the SFT stage, served unmerged by name on vLLM's CPU backend: /v1/models lists
the base and the adapter, and `model: <adapter>` answers differently from the base on the same greedy
prompt. The adapter is the `adapter/` folder that `llmray sft` with `lora.enabled` exports."""

from __future__ import annotations

import json
import random

import pytest

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sft_model(ray_cluster, tiny_model_dir, tmp_path_factory):
    """A short LoRA SFT run of the real stage (Ray Train + DeepSpeed) on chat task records."""
    from llmray.config import load
    from llmray.data import tasks
    from llmray.stages.sft import SFTConfig, run

    work = tmp_path_factory.mktemp("sft_lora")
    rng = random.Random(1)
    data = work / "part-00000.jsonl"
    data.write_text("".join(json.dumps(tasks.sft_record(tasks.make_task(rng))) + "\n" for _ in range(160)))
    cfg = load(SFTConfig, None, [f"model={tiny_model_dir}", f"data={data}", "seq_len=128", "max_steps=12",
                                 "deepspeed.micro_batch_size=4", "optimizer.lr=5e-3", "optimizer.warmup_steps=2",
                                 "lora.enabled=true", "lora.r=8", f"run_dir={work / 'run'}",
                                 f"output={work / 'model'}", "scaling.num_workers=1", "log_every=5",
                                 "checkpoint.every_n_steps=100", "ray.resource_wait_s=30"])
    run(cfg)
    return work / "model"


def test_adapter_is_listed_and_answers_differently(ray_cluster, tiny_model_dir, sft_model):
    import openai

    from llmray.config import build
    from llmray.serving.config import ServeConfig
    from llmray.serving.server import start

    cfg = build(ServeConfig, {"model": str(tiny_model_dir), "served_model_name": "tiny", "port": 0,
                              "app_name": "llm-lora", "route_prefix": "/lora", "api_key": "lora-key-0123456789",
                              "engine": {"max_model_len": 256, "max_num_seqs": 4},
                              "lora": {"adapters": {"sft-lora": str(sft_model / "adapter")}, "max_lora_rank": 8}})
    handle = start(cfg)
    try:
        client = openai.OpenAI(base_url=handle.url, api_key=handle.api_key, max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"tiny", "sft-lora"}
        from llmray.data import tasks

        # A prompt of the kind the adapter was trained on: its answer moves towards the trained format.
        messages = tasks.make_task(random.Random(7)).messages()
        kw = dict(messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        base = client.chat.completions.create(model="tiny", **kw).choices[0].message.content
        tuned = client.chat.completions.create(model="sft-lora", **kw).choices[0].message.content
        assert base != tuned, (base, tuned)
        assert client.chat.completions.create(model="tiny", **kw).choices[0].message.content == base
    finally:
        handle.shutdown()
