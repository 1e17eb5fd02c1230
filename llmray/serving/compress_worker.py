"""Runs INSIDE the isolated llm-compressor environment (llmray.envs): one scheme, one llm-compressor
`oneshot` over our calibration documents, the compressed-tensors checkpoint written to the output dir.

`python compress_worker.py spec.json ...`, one file per scheme (one process imports llm-compressor once for
all of them), each spec = {"model", "output", "scheme", "calibration" (JSONL of {"text"}), "num_samples",
"max_seq_length", "ignore", "group_size", "smoothing_strength"}.
Imports only what that environment has (no llmray): the stage runs it as a script, by path.
"""

from __future__ import annotations

import json
import sys
import time


def recipe(scheme: str, ignore: list[str], group_size: int, smoothing_strength: float):
    """The llm-compressor modifiers of one scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    def w4(symmetric: bool) -> dict:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    if scheme == "w8a8":  # SmoothQuant moves activation outliers into the weights, then GPTQ on INT8 weights
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=smoothing_strength),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if scheme == "w4a16":
        return [GPTQModifier(config_groups=w4(True), ignore=ignore)]
    if scheme == "fp8_dynamic":  # per-channel FP8 weights, per-token dynamic FP8 activations: no calibration
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if scheme == "awq":
        import torch

        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # AWQ pins its cached activations for GPU copies; no GPU, nothing to pin
            IntermediatesCache.pin_memory = lambda self, *a, **k: None

        return [AWQModifier(), QuantizationModifier(config_groups=w4(False), ignore=ignore)]
    raise SystemExit(f"scheme: unknown {scheme!r}")


def compress(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot

    s = json.loads(open(spec_path).read())
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in open(s["calibration"]) if line.strip()][: s["num_samples"]]
    enc = tok(texts, truncation=True, max_length=s["max_seq_length"], add_special_tokens=True)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    print(f"[compress] {s['scheme']}: {len(texts)} calibration documents, "
          f"{sum(map(len, enc['input_ids']))} tokens", flush=True)
    oneshot(model=model, dataset=ds, recipe=recipe(s["scheme"], s["ignore"], s["group_size"], s["smoothing_strength"]),
            max_seq_length=s["max_seq_length"], num_calibration_samples=len(texts))
    model.save_pretrained(s["output"], save_compressed=True)
    tok.save_pretrained(s["output"])
    print(f"[compress] {s['scheme']}: written to {s['output']} in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        compress(path)
    sys.exit(0)
