"""`engine_dtype`: what `dtype: auto` becomes for vLLM engines on this machine."""

from __future__ import annotations

import json

from llmray.hardware import cpu_has_native_bf16, engine_dtype


def test_explicit_dtype_is_kept(tmp_path):
    assert engine_dtype("bfloat16") == "bfloat16" and engine_dtype("float32", tmp_path) == "float32"


def test_auto_follows_the_hardware_and_quantized_checkpoints(tmp_path):
    import torch

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fast_bf16 = torch.cuda.is_available() or cpu_has_native_bf16()
    assert engine_dtype("auto", plain) == ("bfloat16" if fast_bf16 else "float32")
    quant = tmp_path / "quant"
    quant.mkdir()
    (quant / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"format": "int"}}))
    assert engine_dtype("auto", quant) == "auto"  # vLLM takes the dtype the checkpoint was quantized for
