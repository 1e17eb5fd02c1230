"""The one held-out perplexity and verifiable-task accuracy of a model (transformers, batched, CPU).

Used by the pipeline to show what each stage bought (perplexity on held-out synthetic documents,
never in the training corpus: their seeds are disjoint; accuracy on the corpus' `eval/` prompts,
scored by the same rule as the RL reward, `llmray.data.tasks`) and by the quantize stage's quality
gate, on the model running the quantized arithmetic.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path


def heldout_documents(n: int = 64, seed: int = 12345) -> list[str]:
    """Documents from the synthetic grammar with seeds outside the corpus' range."""
    from llmray.data.synthetic import document

    return [document(random.Random(f"heldout-{seed}-{i}")) for i in range(n)]


def read_jsonl_dir(path: str | Path, limit: int | None = None) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(Path(path).glob("*.jsonl")):
        for line in f.open():
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def load(model_dir: str | Path):
    """(model, tokenizer) once, for several evaluations of the same model."""
    from llmray.models.factory import load_pretrained

    return load_pretrained(model_dir)


def perplexity(loaded, texts: list[str], max_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over `texts`, each truncated to `max_len` tokens."""
    import torch

    model, tok = loaded
    tok.padding_side = "right"  # positions count from each text's first token (generation pads left)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_len)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((shift_labels != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def _generate(loaded, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
              num_return_sequences: int = 1, **sampling) -> list[str]:
    """Chat completions with transformers (left padding), decoded without special tokens;
    `num_return_sequences` per prompt, in prompt order."""
    import torch

    model, tok = loaded
    tok.padding_side = "left"
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
            out += tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def generate_greedy(loaded, prompts: list[list[dict]], max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Greedy chat completions with transformers (left padding), decoded without special tokens."""
    return _generate(loaded, prompts, max_new_tokens, batch_size, do_sample=False)


def sampled_accuracy(loaded, records: list[dict], k: int = 8, temperature: float = 1.0,
                     max_new_tokens: int = 16, seed: int = 0, batch_size: int = 32) -> dict:
    """Mean correctness of `k` samples per prompt at `temperature` (mean@k): the policy as it is
    sampled, which is what RL optimises. Also the share of prompts with at least one correct
    sample (pass@k)."""
    import torch

    from llmray.data import tasks

    torch.manual_seed(seed)
    responses = _generate(loaded, [r["prompt"] for r in records], max_new_tokens, batch_size,
                          num_return_sequences=k, do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    per_prompt = [sum(tasks.is_correct(r["answer"], resp) for resp in responses[j * k:(j + 1) * k]) / k
                  for j, r in enumerate(records)]
    n = max(len(per_prompt), 1)
    return {"mean_at_k": sum(per_prompt) / n, "pass_at_k": sum(p > 0 for p in per_prompt) / n, "k": k,
            "temperature": temperature, "n": len(per_prompt), "per_prompt": per_prompt}


def task_accuracy(loaded, records: list[dict], max_new_tokens: int = 16) -> dict:
    """Accuracy and mean rule-based reward on `{"prompt": messages, "answer": str}` records."""
    from llmray.data import tasks

    responses = generate_greedy(loaded, [r["prompt"] for r in records], max_new_tokens)
    rewards = [tasks.reward(r["answer"], resp) for r, resp in zip(records, responses)]
    correct = [tasks.is_correct(r["answer"], resp) for r, resp in zip(records, responses)]
    return {
        "accuracy": sum(correct) / max(len(records), 1),
        "mean_reward": sum(rewards) / max(len(records), 1),
        "n": len(records),
        "examples": [{"prompt": r["prompt"][-1]["content"], "answer": r["answer"], "response": resp}
                     for r, resp in list(zip(records, responses))[:5]],
    }
