"""SFT data: assistant-only labels, and packing without attention across conversations."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from llmray.models.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from llmray.models.factory import load_pretrained

    m, _ = load_pretrained(tiny_model_dir)
    return m


def _chats(n, seed=0):
    from llmray.data import tasks

    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = tasks.make_task(rng)
        msgs = tasks.sft_record(t)["messages"]
        if i % 2:  # multi-turn: a second exchange in the same conversation
            t2 = tasks.make_task(rng)
            msgs = msgs + tasks.sft_record(t2)["messages"]
        out.append(msgs)
    return out


def test_labels_only_on_assistant_tokens(tok):
    from llmray.train.chat_data import IGNORE, encode_chat

    msgs = _chats(2)[1]
    ids, labels = encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
    # Exactly the two assistant answers, each closed by EOS, carry labels.
    text = tok.decode(supervised)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert text == "".join(a + "<|im_end|>" for a in answers)
    assert supervised.count(tok.eos_token_id) == 2
    # Prompt tokens (user text, role headers) carry none.
    n_user = len(tok.apply_chat_template([m for m in msgs[:1]], tokenize=True))
    assert all(label == IGNORE for label in labels[:n_user])


def test_masked_positions_get_no_gradient(tok, model):
    """d(loss)/d(logits) is exactly zero at every position whose next token is not an assistant token."""
    from llmray.train.chat_data import IGNORE, encode_chat
    from llmray.train.lm import token_loss_sum

    ids, labels = encode_chat(tok, _chats(1)[0])
    x = torch.tensor([ids])
    y = torch.tensor([labels])
    logits = model(input_ids=x, use_cache=False).logits.detach().requires_grad_(True)
    s, n = token_loss_sum(logits, y)
    s.backward()
    g = logits.grad[0].abs().sum(-1)  # per position
    should = torch.tensor(labels[1:] + [IGNORE]) != IGNORE  # position t predicts label t+1
    assert n.item() == int(should.sum())
    assert torch.all(g[~should] == 0)
    assert torch.all(g[should] > 0)


def test_packed_loss_equals_sum_of_single_losses(tok, model):
    from llmray.train.chat_data import encode_chat, pack
    from llmray.train.lm import token_loss_sum

    ex = [encode_chat(tok, m) for m in _chats(6, seed=3)]
    rows = pack(ex, seq_len=256, pad_id=tok.pad_token_id)
    assert len(rows) < len(ex)  # several conversations share a row
    packed_sum, packed_n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]]), position_ids=torch.tensor([r["position_ids"]]),
                           use_cache=False).logits
            s, n = token_loss_sum(logits, torch.tensor([r["labels"]]))
            packed_sum += s.item()
            packed_n += n.item()
        alone_sum, alone_n = 0.0, 0
        for ids, labels in ex:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            s, n = token_loss_sum(logits, torch.tensor([labels]))
            alone_sum += s.item()
            alone_n += n.item()
    assert packed_n == alone_n
    assert packed_sum == pytest.approx(alone_sum, rel=1e-5)
    # Without the position resets the conversations would see each other: the loss changes.
    r = rows[0]
    with torch.no_grad():
        leak = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits
        iso = model(input_ids=torch.tensor([r["input_ids"]]), position_ids=torch.tensor([r["position_ids"]]),
                    use_cache=False).logits
    assert not torch.allclose(leak, iso, atol=1e-4)


def test_bad_chat_records_name_file_and_line(tmp_path):
    from llmray.errors import UserError
    from llmray.train.chat_data import read_records, validate_chat

    f = tmp_path / "chats.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(UserError, match=r"chats.jsonl:2: 'messages' has no assistant turn"):
        read_records(f, validate_chat)
    f.write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match=r"chats.jsonl:1: missing field 'messages'"):
        read_records(f, validate_chat)


def test_general_text_mixed_evenly_with_lm_loss_everywhere(tok, tmp_path):
    """`sft.mix`: pretraining rows cut to seq_len carry labels on every token, and the interleaving
    puts the configured ratio into every stretch of rows, in a seeded, repeatable order."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.config import ConfigError, build
    from llmray.data import tasks
    from llmray.stages.sft import SFTConfig, build_rows

    shards = tmp_path / "packed" / "shards"
    shards.mkdir(parents=True)
    seqs = [[(i * 7 + j) % 500 + 3 for j in range(64)] for i in range(10)]
    pq.write_table(pa.table({"input_ids": pa.array(seqs, pa.list_(pa.int32()))}), shards / "part-00000.parquet")
    chat = tmp_path / "chat.jsonl"
    rng = random.Random(0)
    chat.write_text("".join(json.dumps(tasks.sft_record(tasks.make_task(rng))) + "\n"
                            for _ in range(80)))
    cfg = build(SFTConfig, {"data": str(chat), "seq_len": 32, "eval_fraction": 0.1,
                            "mix": {"data": str(tmp_path / "packed"), "ratio": 2.0}})
    rows, held, stats = build_rows(cfg, tok)
    assert stats["general_rows"] == 2 * stats["chat_rows"] and len(rows) == 3 * stats["chat_rows"]
    general = [r for r in rows if r["general"]]
    assert len(general) == stats["general_rows"] and all(-100 not in r["labels"] for r in general)
    pieces = {tuple(s[i:i + 32]) for s in seqs for i in (0, 32)}
    assert all(tuple(r["input_ids"]) in pieces and r["labels"] == r["input_ids"] for r in general)
    # Evenly interleaved: every 6 consecutive rows hold 4 general rows (+-1).
    is_gen = [r["general"] for r in rows]
    assert all(3 <= sum(is_gen[i:i + 6]) <= 5 for i in range(0, len(rows) - 6))
    assert all(any(label == -100 for label in r["labels"]) for r in held)  # eval stays on chat
    assert build_rows(cfg, tok)[0] == rows
    with pytest.raises(ConfigError, match="mix.ratio: must be >= 0"):
        build(SFTConfig, {"mix": {"ratio": -1}}, prefix="sft")


def test_mixed_loss_is_chat_mean_plus_weighted_lm_mean(tok, model):
    """Mixed rows don't dilute the assistant tokens: loss = chat rows' token mean + lm_coef x the
    general rows' token mean, each computed on its own."""
    from llmray.train.chat_data import encode_chat, pack
    from llmray.train.lm import CausalLMTask, token_loss_sum

    chat = pack([encode_chat(tok, m) for m in _chats(6)], 64, tok.pad_token_id)[:2]
    gen = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([r["input_ids"] for r in chat]), gen])
    labels = torch.cat([torch.tensor([r["labels"] for r in chat]), gen])
    pos = torch.cat([torch.tensor([r["position_ids"] for r in chat]), torch.arange(64).expand(2, 64)])
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "general": torch.tensor([0, 0, 1, 1])}
    task = CausalLMTask(tokenizer_dir="unused", lm_coef=0.5)
    with torch.no_grad():
        loss, sums, _ = task.loss(model, batch)

        def mean(rows):
            s, n = token_loss_sum(model(input_ids=ids[rows], position_ids=pos[rows]).logits, labels[rows])
            return s / n
        chat_mean, lm_mean = mean(slice(0, 2)), mean(slice(2, 4))
    assert abs(float(loss) - float(chat_mean + 0.5 * lm_mean)) < 1e-4
    assert abs(sums["loss"] / sums["count"] - float(chat_mean)) < 1e-4
    assert abs(sums["lm_loss"] / sums["count"] - float(lm_mean)) < 1e-4
