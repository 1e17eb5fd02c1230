"""Tokenizer: round trip, chat template with EOS after each assistant turn, vocab validation."""

import pytest

from llmray.config import ConfigError, build
from llmray.models.tokenizer import EOS, load_tokenizer
from llmray.stages.tokenizer import TokenizerConfig


def test_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for text in ["The river walks over the hill.", "What is 12 plus 7?", "naïve café 🙂 \n\ttabs"]:
        assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == 1024


def test_chat_template_and_assistant_mask(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    messages = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "Say the word apple."},
        {"role": "assistant", "content": "The answer is apple."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.count(EOS) == 4 and text.count("<|im_start|>assistant\n") == 2
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == f"The answer is 5.{EOS}The answer is apple.{EOS}"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_vocab_smaller_than_specials_is_refused():
    with pytest.raises(ConfigError, match=r"vocab_size: must exceed the 3 special tokens"):
        build(TokenizerConfig, {"vocab_size": 100})


def test_tokenizer_stage(tmp_path):
    from llmray.data.synthetic import CorpusConfig
    from llmray.stages.corpus import run as make_corpus
    from llmray.stages.tokenizer import run

    corpus = tmp_path / "corpus"
    make_corpus(CorpusConfig(output=str(corpus), num_documents=200, num_sft=10, num_preference=10,
                             num_prompts=10, num_eval=10))
    res = run(TokenizerConfig(corpus=str(corpus / "docs"), output=str(tmp_path / "tok"), vocab_size=512))
    assert res["vocab_size"] == 512 and res["chars_per_token"] > 1.5
    assert run(TokenizerConfig(corpus=str(corpus / "docs"), output=str(tmp_path / "tok")))["skipped"]
