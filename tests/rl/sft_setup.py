"""TEST SETUP ONLY: a short plain-torch SFT of the tiny model on task chats, so RL tests start
from a policy with partial task accuracy (the real SFT stage is `llmray.stages.sft`)."""

from __future__ import annotations

import random
from pathlib import Path


def task_records(n: int, seed: int) -> list[dict]:
    from llmray.data import tasks

    rng = random.Random(seed)
    return [tasks.sft_record(tasks.make_task(rng)) for _ in range(n)]


def quick_sft(base_dir: str | Path, out_dir: str | Path, steps: int = 150, batch_size: int = 32,
              lr: float = 3e-3, seed: int = 0) -> Path:
    """Train the answer tokens for `steps` AdamW steps; save an HF dir."""
    import torch

    from llmray.models.factory import load_pretrained, save_pretrained

    torch.manual_seed(seed)
    model, tok = load_pretrained(base_dir)
    model.train()
    records = task_records(steps * batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    # Prompt as the rollout engine sees it (chat template + generation prompt), then the answer's
    # tokens and EOS: exactly the sequences RL will sample, loss on the answer only.
    seqs = []
    for r in records:
        p = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
        a = tok.encode(r["messages"][-1]["content"], add_special_tokens=False) + [tok.eos_token_id]
        seqs.append((list(p), a))
    for step in range(steps):
        rows = seqs[step * batch_size:(step + 1) * batch_size]
        L = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), L), tok.pad_token_id)
        labels = torch.full((len(rows), L), -100)
        att = torch.zeros(len(rows), L, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            att[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return save_pretrained(model, tok, out_dir)


def accuracy(model_dir: str | Path, n: int = 64, seed: int = 123) -> float:
    """Greedy task accuracy with transformers."""
    import torch

    from llmray.data import tasks
    from llmray.models.factory import load_pretrained

    model, tok = load_pretrained(model_dir)
    rng = random.Random(seed)
    ok = 0
    for _ in range(n):
        t = tasks.make_task(rng)
        ids = tok.apply_chat_template(t.messages(), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ok += tasks.is_correct(t.answer, tok.decode(out[0, len(ids):], skip_special_tokens=True))
    return ok / n
