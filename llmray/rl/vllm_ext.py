"""vLLM worker extension that loads pushed weight buckets into the running engine and reports a checksum.

Mixed into vLLM's worker with `LLM(..., worker_extension_cls="llmray.rl.vllm_ext.WeightLoader")` and
called through `llm.collective_rpc("llmray_load_bucket", args=(payload,))`. The payload is the
bucket serialized as safetensors bytes: tensors passed directly in collective_rpc arguments are
turned into lists, and Python callables are refused. Loading goes through vLLM's in-place
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
        """Load one bucket (safetensors bytes) in place; return its checksum and size."""
        from safetensors.torch import load

        from llmray.rl.weight_sync import checksum

        state = load(payload)
        items = sorted(state.items())
        digest = checksum(items)
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
        return {"checksum": digest, "num_tensors": len(items), "bytes": len(payload)}

    # -- GPU: NCCL transport (see llmray.rl.weight_sync.NcclTransport) -----------------------
    def llmray_nccl_init(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> int:
        """Join the trainer's weight-broadcast group as rank `rank_offset + tp_rank`."""
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_tp_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + get_tp_group().rank_in_group
        pg = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self._llmray_nccl = PyNcclCommunicator(pg, device=torch.cuda.current_device())
        return rank

    def llmray_nccl_receive(self, meta: list[tuple[str, str, list[int]]]) -> dict:
        """Receive one bucket by broadcast from rank 0 (names, dtypes, shapes in `meta`) and load it."""
        import torch

        from llmray.rl.weight_sync import checksum

        tensors = []
        for name, dtype, shape in meta:
            t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device="cuda")
            self._llmray_nccl.broadcast(t, src=0, stream=torch.cuda.current_stream())
            tensors.append((name, t))
        torch.cuda.synchronize()
        digest = checksum(tensors)
        self.reload_weights(weights_iterator=_to_engine_dtype(tensors, self.model_config.dtype))
        _refresh_tied(self.model_runner.get_model(), {n for n, _ in tensors})
        return {"checksum": digest, "num_tensors": len(tensors),
                "bytes": sum(t.numel() * t.element_size() for _, t in tensors)}


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
