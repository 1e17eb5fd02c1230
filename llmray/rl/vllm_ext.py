"""vLLM worker extension that loads pushed weight buckets into the running engine and reports a checksum.

Mixed into vLLM's worker with `LLM(..., worker_extension_cls="llmray.rl.vllm_ext.WeightLoader")`.
Object-store transport: `llm.collective_rpc("llmray_load_bucket", args=(payload,))`, the payload being
the bucket serialized as safetensors bytes (tensors passed directly in collective_rpc arguments are
turned into lists, and Python callables are refused). Collective transport: the worker joins the
actor's broadcast group (`llmray_weight_join`) and receives the tensors itself
(`llmray_weight_receive(plan)`); only the plan crosses collective_rpc. Loading goes through vLLM's in-place
`reload_weights` (checkpoint-format names, layer-wise processing), which survives the CPU
backend's weight repacking — a direct `model.load_weights` after start-up does not. A layer whose
weights are only partly present would be processed with garbage, so buckets keep fused groups
(q/k/v, gate/up) whole; see `llmray.rl.weight_sync.make_buckets`.
"""

from __future__ import annotations

import logging


class WeightLoader:
    """Methods added to every vLLM worker (one per tensor-parallel rank)."""

    def llmray_load_bucket(self, payload: bytes) -> dict:
        """Object-store transport: load one bucket (safetensors bytes) in place; its checksum and size."""
        from safetensors.torch import load

        from llmray.rl.weight_sync import checksum

        items = sorted(load(payload).items())
        digest = checksum(items)
        self._llmray_load(items)
        return {"checksum": digest, "num_tensors": len(items), "bytes": len(payload)}

    def _llmray_load(self, items: list) -> None:
        """Load (name, tensor) pairs in place through vLLM's layer-wise `reload_weights`."""
        items = _to_engine_dtype(items, self.model_config.dtype)
        # reload_weights warns once per layer absent from this bucket; that is expected here.
        quiet = logging.getLogger("vllm.model_executor.model_loader.reload")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=items)
        finally:
            quiet.setLevel(level)
        _refresh_tied(self.model_runner.get_model(), {name for name, _ in items})

    # -- collective transport (llmray.rl.weight_collective): this worker joins the group itself --
    def llmray_weight_join(self, rank_offset: int, host: str, port: int, world_size: int, backend: str,
                           timeout_s: float, name: str) -> int:
        """Join the actor's weight-broadcast group as rank `rank_offset + tp_rank` (the sender is rank 0)."""
        from vllm.distributed.parallel_state import get_tp_group

        from llmray.rl.weight_collective import WeightGroup

        self.llmray_weight_leave()
        rank = rank_offset + get_tp_group().rank_in_group
        self._llmray_group = WeightGroup(host, port, rank, world_size, backend, timeout_s, name)
        return rank

    def llmray_weight_receive(self, plan: list) -> list[dict]:
        """Receive every bucket of `plan` by broadcast and load it; per bucket its checksum and size."""
        from llmray.rl.weight_collective import receive_buckets

        group = getattr(self, "_llmray_group", None)
        if group is None:
            raise RuntimeError("this rollout engine is in no weight-broadcast group (weight_join first)")
        try:
            return receive_buckets(group, plan, self._llmray_load)
        except BaseException:
            self.llmray_weight_leave()
            raise

    def llmray_weight_leave(self) -> None:
        group, self._llmray_group = getattr(self, "_llmray_group", None), None
        if group is not None:
            group.close()


def _to_engine_dtype(items: list, dtype) -> list:
    """Cast floating tensors to the engine's dtype (fp32 actor -> bf16 engine): vLLM's loader would
    cast the same way on copy, but warns once per tensor per push (806 lines in one `make run`)."""
    return [(n, t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for n, t in items]


def _refresh_tied(model, loaded: set[str]) -> list[str]:
    """Re-run weight post-processing on modules that share a loaded weight but were not loaded themselves.

    Tied embeddings: vLLM loads `model.embed_tokens.weight` and skips `lm_head.weight`; the storage is
    shared, but on CPU the LM head keeps a prepacked GEMM copy (`cpu_linear`) built at start-up, so
    without this it would keep computing logits with the old embeddings.
    """
    import torch

    by_ptr: dict[int, list[tuple[str, object]]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not w.is_meta:
            by_ptr.setdefault(w.data_ptr(), []).append((name, mod))
    refreshed = []
    for mods in by_ptr.values():
        if len(mods) < 2 or not any(f"{n}.weight" in loaded for n, _ in mods):
            continue
        for n, mod in mods:
            qm = getattr(mod, "quant_method", None)
            if f"{n}.weight" not in loaded and qm is not None:
                qm.process_weights_after_loading(mod)
                refreshed.append(n)
    return refreshed
