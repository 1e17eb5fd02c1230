"""A LoRA adapter served unmerged by name on vLLM's CPU backend: /v1/models lists the base and the
adapter, and `model: <adapter>` answers differently from the base on the same greedy prompt. The
adapter is saved the way the SFT stage exports it (peft `save_pretrained`, see LMTask.export)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    # init_lora_weights=False: random A and B (peft's default B=0 would be a no-op adapter).
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(50.0)  # large enough to move the greedy tokens of an untrained model
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(out))
    return out


def test_adapter_is_listed_and_answers_differently(ray_cluster, tiny_model_dir, adapter_dir):
    import openai

    from llmray.config import build
    from llmray.serving.config import ServeConfig
    from llmray.serving.server import start

    cfg = build(ServeConfig, {"model": str(tiny_model_dir), "served_model_name": "tiny", "port": 0,
                              "app_name": "llm-lora", "route_prefix": "/lora", "api_key": "lora-key-0123456789",
                              "engine": {"max_model_len": 256, "max_num_seqs": 4},
                              "lora": {"adapters": {"sft-lora": str(adapter_dir)}, "max_lora_rank": 8}})
    handle = start(cfg)
    try:
        client = openai.OpenAI(base_url=handle.url, api_key=handle.api_key, max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"tiny", "sft-lora"}
        kw = dict(prompt="the cat sat on the", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        base = client.completions.create(model="tiny", **kw).choices[0].text
        tuned = client.completions.create(model="sft-lora", **kw).choices[0].text
        assert base != tuned
        assert client.completions.create(model="tiny", **kw).choices[0].text == base
    finally:
        handle.shutdown()
