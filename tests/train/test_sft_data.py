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
