"""Weight sync: buckets keep fused groups whole, checksums agree on both sides, a corrupted bucket
and a stuck engine fail with WeightSyncError naming the engine; HF rollout workers on 2 ranks
(split dispatch, global prompt indices, logprobs) — the baseline/fallback engine."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_token_logprobs  # noqa: E402

from llmray.rl.dispatch import register  # noqa: E402
from llmray.rl.weight_sync import (WeightSync, WeightSyncError, checksum, fused_group, make_buckets,  # noqa: E402
                                   put_buckets)
from llmray.rl.worker_group import WorkerGroup  # noqa: E402
from llmray.rl.workers.rollout import HFRolloutWorker, UserError, sampling_settings  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def llama_like(layers: int = 3, h: int = 64) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = [("model.embed_tokens.weight", torch.randn(100, h, generator=g))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h // 2, h)),
                         ("self_attn.v_proj", (h // 2, h)), ("self_attn.o_proj", (h, h)),
                         ("mlp.gate_proj", (2 * h, h)), ("mlp.up_proj", (2 * h, h)), ("mlp.down_proj", (h, 2 * h)),
                         ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]:
            out.append((p + n + ".weight", torch.randn(*shape, generator=g)))
    out.append(("model.norm.weight", torch.ones(h)))
    return out


def test_fused_group_names():
    assert fused_group("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert fused_group("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert fused_group("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.self_attn.o_proj.weight"


@pytest.mark.parametrize("bucket_mb", [1e-6, 0.03, 0.1, 100])
def test_buckets_keep_fused_groups_whole_and_cover_everything(bucket_mb):
    tensors = llama_like()
    buckets = make_buckets(tensors, bucket_mb)
    names = [n for b in buckets for n in b["tensors"]]
    assert names == [n for n, _ in tensors]                         # all, once, in order
    home = {n: i for i, b in enumerate(buckets) for n in b["tensors"]}
    for n in names:                                                 # q/k/v and gate/up share a bucket
        assert home[n] == home[next(m for m in names if fused_group(m) == fused_group(n))]
    budget = bucket_mb * 2**20
    for b in buckets:
        assert b["bytes"] == sum(t.numel() * 4 for t in b["tensors"].values())
        groups = {fused_group(n) for n in b["tensors"]}
        assert b["bytes"] <= budget or len(groups) == 1              # over budget only for one big group
    assert sum(b["bytes"] for b in buckets) == sum(t.numel() * 4 for _, t in tensors)
    if bucket_mb == 100:
        assert len(buckets) == 1
    if bucket_mb == 1e-6:
        assert len(buckets) == len({fused_group(n) for n in names})  # one group per bucket


def test_checksum_deterministic_order_free_and_sensitive():
    tensors = llama_like(1)
    a = checksum(tensors)
    assert a == checksum(list(reversed(tensors))) == checksum([(n, t.clone()) for n, t in tensors])
    changed = [(n, t.clone()) for n, t in tensors]
    changed[3][1].view(-1)[5] += 1e-6
    assert checksum(changed) != a
    assert checksum([(n, t.to(torch.bfloat16)) for n, t in tensors]) != a     # dtype is part of it
    renamed = [("x" + n, t) for n, t in tensors]
    assert checksum(renamed) != a


def test_bucket_cast_to_engine_dtype_matches_copy_into_param():
    from llmray.rl.vllm_ext import _to_engine_dtype

    w, idx, same = torch.randn(4, 3), torch.arange(5), torch.randn(2, dtype=torch.bfloat16)
    out = dict(_to_engine_dtype([("w", w), ("idx", idx), ("same", same)], torch.bfloat16))
    param = torch.empty(4, 3, dtype=torch.bfloat16)
    param.copy_(w)  # what vLLM's default weight loader does with an fp32 tensor
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], param)
    assert out["idx"] is idx and out["same"] is same


def test_sampling_settings_reject_bad_keys():
    with pytest.raises(UserError, match="unknown key.*temprature"):
        sampling_settings({"temprature": 1.0})
    with pytest.raises(UserError, match="sampling.n must be >= 1"):
        sampling_settings({"n": 0})
    assert sampling_settings({"top_k": 5})["top_k"] == 5


class FaultyHF(HFRolloutWorker):
    """HFRolloutWorker with switchable faults: a transport that flips one value of every bucket,
    or an engine stuck in its load."""

    fault: str | None = None

    @register("broadcast")
    def set_fault(self, fault: str | None, rank: int | None = None) -> None:
        if rank is None or int(os.environ["RANK"]) == rank:
            self.fault = fault

    @register("broadcast")
    def load_weights(self, bucket) -> dict:
        b = ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket
        if self.fault == "stuck":
            time.sleep(30)
        if self.fault == "corrupt":
            name = next(iter(b["tensors"]))
            t = b["tensors"][name].clone()
            t.view(-1)[0] += 1.0
            b = {**b, "tensors": {**b["tensors"], name: t}}
        return super().load_weights(b)


@pytest.fixture(scope="module")
def hf_group(ray_cluster, tiny_model_dir):
    g = WorkerGroup("rollout", FaultyHF, num_workers=2, resources={"CPU": 0.25}, call_timeout_s=300,
                    init_kwargs={"model_dir": str(tiny_model_dir), "max_model_len": 128, "batch_size": 8})
    yield g
    g.shutdown()


def test_hf_rollout_split_over_ranks(hf_group, tiny_model_dir):
    from llmray.models.factory import load_pretrained

    prompts = [[1, 5, 6, 7], [1, 40, 41], [1, 300, 301, 302, 303], [1, 9], [1, 77, 78]]
    out = hf_group.generate(prompts, {"n": 2, "max_tokens": 6, "seed": 0, "temperature": 1.0})
    assert [(o["prompt_index"], o["sample_index"]) for o in out] == [(i, j) for i in range(5) for j in range(2)]
    model = load_pretrained(tiny_model_dir)[0]
    for o in out:
        assert o["prompt_ids"] == prompts[o["prompt_index"]]
        assert len(o["response_ids"]) == len(o["logprobs"]) >= 1
        ref = hf_token_logprobs(model, o["prompt_ids"], o["response_ids"])
        assert max(abs(a - b) for a, b in zip(o["logprobs"], ref)) < 1e-3
    assert hf_group.tokenizer_info()["eos_token_id"] == 2


def test_push_to_hf_group_and_checksums(hf_group, other_model_dir, tiny_model_dir):
    from llmray.models.factory import load_pretrained

    other = load_pretrained(other_model_dir)[0]
    sync = WeightSync(bucket_mb=0.25, timeout_s=60)
    m = sync.push(put_buckets(other.named_parameters(), 0.25), hf_group)
    assert m["weight_sync/engines"] == 2 and m["weight_sync/buckets"] >= 4
    p = [[1, 5, 6, 7]]
    o = hf_group.generate(p, {"max_tokens": 5, "temperature": 0.0})[0]
    assert max(abs(a - b) for a, b in zip(o["logprobs"], hf_token_logprobs(other, p[0], o["response_ids"]))) < 1e-3
    sync.push(load_pretrained(tiny_model_dir)[0].named_parameters(), hf_group)   # back to the original


def test_checksum_mismatch_is_detected(hf_group, other_model_dir):
    from llmray.models.factory import load_pretrained

    hf_group.set_fault("corrupt", rank=1)
    try:
        with pytest.raises(WeightSyncError, match=r"checksum mismatch on rollout rank 1, bucket 0"):
            WeightSync(bucket_mb=1).push(load_pretrained(other_model_dir)[0].named_parameters(), hf_group)
    finally:
        hf_group.set_fault(None)


def test_stuck_sync_fails_within_timeout(hf_group, tiny_model_dir):
    """Last in the module: the stuck rank stays busy until the group is shut down."""
    from llmray.models.factory import load_pretrained

    tensors = list(load_pretrained(tiny_model_dir)[0].named_parameters())
    hf_group.set_fault("stuck", rank=1)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"timed out after 2s: engine rank\(s\) \[1\] still loading"):
        WeightSync(bucket_mb=1, timeout_s=2).push(tensors, hf_group)
    assert time.monotonic() - t0 < 10
