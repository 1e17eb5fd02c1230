"""Rollout workers: a real vLLM engine (`RolloutWorker`) or batched transformers `generate`
(`HFRolloutWorker`, the benchmark baseline and the fallback without vLLM), same API.

From a script (the `if __name__ == "__main__":` guard is required wherever a vLLM engine starts):

    from llmray.cluster import init_ray
    from llmray.rl.worker_group import WorkerGroup
    from llmray.rl.workers.rollout import RolloutWorker, HFRolloutWorker

    init_ray()
    group = WorkerGroup("rollout", RolloutWorker, num_workers=1, resources={"CPU": 1},
                        init_kwargs={"model_dir": "/path/to/hf_dir", "max_model_len": 512, "dtype": "bfloat16"})
    samples = group.generate(prompt_ids, {"n": 4, "temperature": 1.0, "max_tokens": 64, "seed": 0})
    # one dict per (prompt, sample), prompt-major:
    # {"prompt_index", "sample_index", "prompt_ids", "response_ids", "logprobs", "cumulative_logprob",
    #  "text", "finish_reason"}
    group.shutdown()

`HFRolloutWorker` takes the same init kwargs (plus `batch_size`) and returns the same dicts.
Logprobs are those of the model's raw distribution (log-softmax of the logits, before
temperature/top-k/top-p), i.e. what the actor recomputes at temperature 1; set
`logprobs_mode="processed_logprobs"` on RolloutWorker for the sampling distribution instead.
Sampling with a seed draws prompt i's samples from seed + i (i global across ranks), so results do
not depend on how many rollout workers share the batch.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llmray.errors import UserError
from llmray.rl.dispatch import register

SAMPLING_KEYS = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 64, "seed": None,
                 "stop_token_ids": None, "min_tokens": 0, "ignore_eos": False}


def sampling_settings(sampling: dict | None) -> dict:
    """The sampling dict with defaults filled in; an unknown key or a bad value raises UserError naming it."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise UserError(f"sampling: unknown key(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
    s = {**SAMPLING_KEYS, **{k: v for k, v in sampling.items() if v is not None or k == "seed"}}
    if int(s["n"]) < 1:
        raise UserError(f"sampling.n must be >= 1, got {s['n']}")
    if int(s["max_tokens"]) < 1:
        raise UserError(f"sampling.max_tokens must be >= 1, got {s['max_tokens']}")
    if float(s["temperature"]) < 0:
        raise UserError(f"sampling.temperature must be >= 0, got {s['temperature']}")
    if not 0 < float(s["top_p"]) <= 1:
        raise UserError(f"sampling.top_p must be in (0, 1], got {s['top_p']}")
    s["stop_token_ids"] = [int(t) for t in (s["stop_token_ids"] or [])]
    return s


def prompt_seed(seed: int | None, prompt_index: int) -> int | None:
    """A well-mixed 31-bit seed per (seed, global prompt index). vLLM draws sample j of a request from
    seed + j, so plain seed + index would replay prompt i's sample 1 as prompt i+1's sample 0."""
    if seed is None:
        return None
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(prompt_index) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    return int((x ^ (x >> 29)) & 0x7FFFFFFF)


def _check_prompts(prompt_ids: list[list[int]], max_tokens: int, max_model_len: int, offset: int) -> None:
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise UserError(f"prompt {offset + i} is empty")
        if len(p) + max_tokens > max_model_len:
            raise UserError(f"prompt {offset + i} has {len(p)} tokens + max_tokens {max_tokens} > "
                            f"max_model_len {max_model_len}; shorten it or raise rollout.max_model_len")


def _resolve(bucket: Any) -> dict:
    import ray

    return ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket


def rollout_engine(model_dir: str, max_model_len: int = 512, dtype: str = "auto", seed: int = 0,
                   enforce_eager: bool = True, kv_cache_gb: float = 1.0, tensor_parallel_size: int = 1,
                   gpu_memory_utilization: float = 0.5, logprobs_mode: str = "raw_logprobs", in_process: bool = True,
                   max_num_seqs: int = 256, **_worker_only) -> tuple:
    """(EngineConfig, extra `vllm.LLM` kwargs) of a rollout engine built with these init kwargs; pure, so
    that `llmray plan` prints the engine arguments the worker will use."""
    from llmray.vllm_engine import EngineConfig

    # The engine in this process (`engine_core`): killing this actor's process kills the engine with it.
    cfg = EngineConfig(dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
                       enforce_eager=enforce_eager, kv_cache_gb=kv_cache_gb, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization,
                       worker_process="engine_core" if in_process else "separate")
    return cfg, {"worker_extension_cls": "llmray.rl.vllm_ext.WeightLoader", "logprobs_mode": logprobs_mode,
                 "enable_prefix_caching": True}


class RolloutWorker:
    """One vLLM engine (`vllm.LLM`) in this process: generation with per-token logprobs, in-place weight loads."""

    def __init__(self, model_dir: str, max_model_len: int = 512, dtype: str = "auto", seed: int = 0,
                 enforce_eager: bool = True, kv_cache_gb: float = 1.0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, logprobs_mode: str = "raw_logprobs",
                 in_process: bool = True, max_num_seqs: int = 256, cpu_threads_bind: str | None = "nobind"):
        from llmray.vllm_engine import build_llm

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"rollout.model_dir: {model_dir} has no config.json (not a Hugging Face model dir)")
        # CPU only. "nobind": OpenMP threads follow OMP_NUM_THREADS, which Ray sets from the actor's
        # num_cpus; vLLM's "auto" pins threads to every core of the NUMA node, on top of the other
        # actors of that node (57 vs 32 tok/s on a busy 2-core box). Or "0-3" etc.
        if cpu_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
        cfg, extra = rollout_engine(model_dir, max_model_len, dtype, seed, enforce_eager, kv_cache_gb,
                                    tensor_parallel_size, gpu_memory_utilization, logprobs_mode, in_process,
                                    max_num_seqs)
        t0 = time.monotonic()
        self.model_dir, self.max_model_len = model_dir, max_model_len
        try:
            self.llm = build_llm(model_dir, cfg, **extra)
        except Exception as e:  # noqa: BLE001 - the engine's own error, with the model named
            raise UserError(f"rollout engine failed to start on {model_dir}: {type(e).__name__}: {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.start_s = time.monotonic() - t0

    @register("split", offset_kwarg="index_offset")
    def generate(self, prompt_ids: list[list[int]], sampling: dict, index_offset: int = 0) -> list[dict]:
        """Sample `n` responses per prompt; one dict per (prompt, sample), prompt-major."""
        from vllm import SamplingParams

        s = sampling_settings(sampling)
        if not prompt_ids:
            return []
        _check_prompts(prompt_ids, int(s["max_tokens"]), self.max_model_len, index_offset)
        params = [
            SamplingParams(n=int(s["n"]), temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                           top_k=int(s["top_k"]), max_tokens=int(s["max_tokens"]), min_tokens=int(s["min_tokens"]),
                           seed=prompt_seed(s["seed"], index_offset + i),
                           stop_token_ids=s["stop_token_ids"], ignore_eos=bool(s["ignore_eos"]), logprobs=0)
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i, (p, out) in enumerate(zip(prompt_ids, outs)):
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[k][tok].logprob) for k, tok in enumerate(ids)]
                results.append({"prompt_index": index_offset + i, "sample_index": j, "prompt_ids": list(p),
                                "response_ids": ids, "logprobs": lps, "text": c.text,
                                "cumulative_logprob": (float(c.cumulative_logprob)
                                                       if c.cumulative_logprob is not None else sum(lps)),
                                "finish_reason": c.finish_reason or "length"})
        return results

    @register("rank0")
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy response token ids (ends with EOS when the model stopped)."""
        out = self.generate(prompt_ids, {"temperature": 0.0, "max_tokens": max_tokens})
        return [o["response_ids"] for o in out]

    @register("broadcast")
    def load_weights(self, bucket) -> dict:
        """Load one bucket (dict from `make_buckets`, or its object ref) in place; report its checksum."""
        from llmray.rl.weight_sync import bucket_payload

        payload = bucket_payload(_resolve(bucket))
        reports = self.llm.collective_rpc("llmray_load_bucket", args=(payload,))
        sums = {r["checksum"] for r in reports}
        return {"checksum": sums.pop() if len(sums) == 1 else f"inconsistent:{sorted(sums)}",
                "num_tensors": reports[0]["num_tensors"], "bytes": reports[0]["bytes"]}

    @register("broadcast")
    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # Collective transport: the engine's model workers join the actor's broadcast group themselves
    # (in this process on CPU, in vLLM's worker processes on GPU); only the plan crosses collective_rpc.
    @register("broadcast")
    def weight_join(self, rank_offset: int, host: str, port: int, world_size: int, backend: str,
                    timeout_s: float, name: str) -> list[int]:
        """`rank_offset`: this engine's first rank in the group (the sender is rank 0)."""
        return self.llm.collective_rpc("llmray_weight_join",
                                       args=(rank_offset, host, port, world_size, backend, timeout_s, name))

    @register("broadcast")
    def weight_receive(self, plan: list) -> list[dict]:
        """Per bucket: the checksum all tensor-parallel workers agree on (else `inconsistent:...`)."""
        per_worker = self.llm.collective_rpc("llmray_weight_receive", args=(plan,))
        out = []
        for b in zip(*per_worker):
            sums = {r["checksum"] for r in b}
            out.append({**b[0], "checksum": sums.pop() if len(sums) == 1 else f"inconsistent:{sorted(sums)}"})
        return out

    @register("broadcast")
    def weight_leave(self) -> None:
        self.llm.collective_rpc("llmray_weight_leave")

    @register("rank0")
    def tokenizer_info(self) -> dict:
        """What the controller compares across roles (same tokenizer everywhere)."""
        return _tokenizer_info(self.tokenizer)

    @register("broadcast")
    def info(self) -> dict:
        return {"engine": "vllm", "pid": os.getpid(), "model_dir": self.model_dir, "start_s": self.start_s}


class HFRolloutWorker:
    """Batched transformers `generate` behind the RolloutWorker API (the baseline, or the fallback without vLLM)."""

    def __init__(self, model_dir: str, max_model_len: int = 512, dtype: str = "float32", seed: int = 0,
                 batch_size: int = 64, num_threads: int | None = None, **_ignored):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"rollout.model_dir: {model_dir} has no config.json (not a Hugging Face model dir)")
        if num_threads:
            torch.set_num_threads(num_threads)
        t0 = time.monotonic()
        self.model_dir, self.max_model_len, self.batch_size, self.seed = model_dir, max_model_len, batch_size, seed
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "auto": torch.float32}[dtype]
        from llmray.device import worker_device

        self.device = worker_device()  # the GPU Ray gave this actor (rollout.gpus_per_worker), or the CPU
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        self.start_s = time.monotonic() - t0

    @register("split", offset_kwarg="index_offset")
    def generate(self, prompt_ids: list[list[int]], sampling: dict, index_offset: int = 0) -> list[dict]:
        s = sampling_settings(sampling)
        if not prompt_ids:
            return []
        _check_prompts(prompt_ids, int(s["max_tokens"]), self.max_model_len, index_offset)
        results = []
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start:start + self.batch_size]
            results.extend(self._generate_batch(chunk, s, index_offset + start))
        return results

    def _generate_batch(self, prompt_ids: list[list[int]], s: dict, offset: int) -> list[dict]:
        import torch

        n = int(s["n"])
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding: generation continues from the right edge
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        stops = ([] if s["ignore_eos"] else [self.eos_id]) + s["stop_token_ids"]
        greedy = float(s["temperature"]) == 0.0
        gen: dict[str, Any] = dict(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=int(s["max_tokens"]),
            min_new_tokens=int(s["min_tokens"]) or None, num_return_sequences=n, do_sample=not greedy,
            pad_token_id=self.pad_id, eos_token_id=stops or None, return_dict_in_generate=True,
            output_logits=True, use_cache=True,
        )
        if not greedy:
            gen.update(temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                       top_k=int(s["top_k"]) or None)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        if s["seed"] is not None:
            torch.manual_seed(int(s["seed"]) + offset)
        with torch.no_grad():
            out = self.model.generate(**gen)
        new = out.sequences[:, width:]                               # (B*n, T)
        logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # raw distribution, (B*n, T, V)
        tok_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()  # results leave on the CPU
        new = new.cpu()
        results = []
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            length, reason = len(toks), "length"
            for k, t in enumerate(toks):
                if t in stops:
                    length, reason = k + 1, "stop"
                    break
            resp = toks[:length]
            i, j = divmod(row, n)
            results.append({"prompt_index": offset + i, "sample_index": j, "prompt_ids": list(prompt_ids[i]),
                            "response_ids": resp, "logprobs": tok_lp[row, :length].tolist(),
                            "cumulative_logprob": float(tok_lp[row, :length].sum()),
                            "text": self.tokenizer.decode(resp, skip_special_tokens=True),
                            "finish_reason": reason})
        return results

    @register("rank0")
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        out = self.generate(prompt_ids, {"temperature": 0.0, "max_tokens": max_tokens})
        return [o["response_ids"] for o in out]

    @register("broadcast")
    def load_weights(self, bucket) -> dict:
        from llmray.rl.weight_sync import checksum

        tensors = _resolve(bucket)["tensors"]
        digest = checksum(tensors.items())
        self._load_named(list(tensors.items()))
        return {"checksum": digest, "num_tensors": len(tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}

    def _load_named(self, named) -> None:
        import torch

        own = dict(self.model.named_parameters())
        unknown = sorted(n for n, _ in named if n not in own)
        if unknown:
            raise UserError(f"weight bucket has tensors this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, t in named:
                own[name].copy_(t.to(own[name].dtype))

    @register("broadcast")
    def weight_join(self, rank_offset: int, host: str, port: int, world_size: int, backend: str,
                    timeout_s: float, name: str) -> list[int]:
        from llmray.rl.weight_collective import WeightGroup

        self.weight_leave()
        self._weight_group = WeightGroup(host, port, rank_offset, world_size, backend, timeout_s, name)
        return [rank_offset]

    @register("broadcast")
    def weight_receive(self, plan: list) -> list[dict]:
        from llmray.rl.weight_collective import receive_buckets

        try:
            return receive_buckets(self._weight_group, plan, self._load_named)
        except BaseException:
            self.weight_leave()
            raise

    @register("broadcast")
    def weight_leave(self) -> None:
        group, self._weight_group = getattr(self, "_weight_group", None), None
        if group is not None:
            group.close()

    @register("broadcast")
    def reset_prefix_cache(self) -> None:
        return None  # no cache kept between calls

    @register("rank0")
    def tokenizer_info(self) -> dict:
        return _tokenizer_info(self.tokenizer)

    @register("broadcast")
    def info(self) -> dict:
        return {"engine": "hf", "pid": os.getpid(), "model_dir": self.model_dir, "start_s": self.start_s}


def _tokenizer_info(tok) -> dict:
    return {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id}


