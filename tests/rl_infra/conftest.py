"""Fixtures for the RL infrastructure tests: a second tiny model with different weights, HF helpers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Same shape and tokenizer as `tiny_model_dir`, different weights (seed 1, larger init so
    greedy choices are far from ties)."""
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("other_model")
    save_pretrained(build_model(ModelConfig(preset="tiny", init_std=0.08), tok, seed=1), tok, out)
    return out


def hf_token_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response_t | prompt, response_<t) under a transformers causal LM (teacher forcing)."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)].tolist()


def hf_greedy(model, prompt: list[int], max_tokens: int, eos_id: int) -> list[int]:
    """Plain argmax decoding, one token at a time, stopping after EOS."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == eos_id:
                break
    return out
