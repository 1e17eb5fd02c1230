"""Hugging Face model directories: the one check that a directory holds a usable model, its shape,
and its tokenizer checked against the model's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmray.errors import UserError


def check_model_dir(path: str | Path, key: str = "model", *, tokenizer: bool = True,
                    weights: bool = True) -> dict[str, Any]:
    """config.json of an HF model directory (a `model` artifact or a bare HF dir). Raises UserError naming
    `key` when the directory, its config, its tokenizer files (`tokenizer=True`) or its weights
    (`weights=True`) are missing, or when its artifact manifest is of another kind."""
    from llmray import artifacts

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{key}: directory not found: {p}")
    if (p / artifacts.MANIFEST).exists():
        artifacts.require(p, "model")
    if not (p / "config.json").is_file():
        raise UserError(f"{key}: {p} is not a Hugging Face model directory (no config.json)")
    if weights and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"{key}: {p} has no weights (*.safetensors)")
    if tokenizer and not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise UserError(f"{key}: {p} has no tokenizer files")
    return json.loads((p / "config.json").read_text())


def model_shape(hf: dict):
    """The `ModelShape` of an HF Llama-style config.json."""
    from llmray.models.factory import ModelShape

    return ModelShape(hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                      hf.get("num_key_value_heads") or hf["num_attention_heads"], hf["intermediate_size"],
                      hf["max_position_embeddings"], bool(hf.get("tie_word_embeddings", True)))


def load_tokenizer_checked(model_dir: str | Path, hf: dict):
    """The directory's tokenizer; UserError when it has more tokens than the model's embedding."""
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    if len(tok) > hf["vocab_size"]:
        raise UserError(f"tokenizer/model vocabulary mismatch in {model_dir}: tokenizer has {len(tok)} tokens, "
                        f"the model's embedding only {hf['vocab_size']}")
    return tok
