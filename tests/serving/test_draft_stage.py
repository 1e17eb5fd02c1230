"""The draft stage on the tiny model: the distilled draft accepts more of its proposals than an untrained draft
of the same shape on held-out prompts, greedy outputs stay those of no speculation, the loss falls, the gate's
decision lands in the manifest; config errors name the key; the gate's decision rule (pure)."""

from __future__ import annotations

import pytest

# Lean on purpose (the suite's time budget): small data and step counts.
SMALL = {
    "data": {"prompts": 32, "documents": 32, "max_new_tokens": 32, "sampled": 0, "prefix_tokens": 16},
    "train": {"steps": 60, "batch_size": 16, "lr": 0.003, "kl_weight": 1.0},
    "gate": {"prompts": 6, "max_tokens": 16, "min_requests": 2, "candidates": ["draft", "ngram"], "min_speedup": 1.1},
    "max_model_len": 256,
}


def lm_target(tiny_model_dir, out, steps: int = 150):
    """The tiny model after `steps` of next-token training on synthetic documents. An untrained tied-embedding
    model only repeats its last token, which any untrained draft of the same kind also predicts (both
    accepted 1.0 of their proposals): a target that learnt some text tells a trained draft from a random one."""
    import random

    from llmray.data import synthetic
    from llmray.models.draft import distil, save_draft
    from llmray.models.factory import load_pretrained

    model, tok = load_pretrained(tiny_model_dir)
    rng = random.Random(7)
    seqs = [(tok(synthetic.document(rng))["input_ids"][:96], 1) for _ in range(400)]
    distil(model, None, seqs, steps, 16, 3e-3, 0.0, tok.pad_token_id, progress=lambda m: None)
    return save_draft(model, tiny_model_dir, out)  # same files: config, weights, tokenizer


@pytest.fixture(scope="module")
def draft_run(tmp_path_factory, tiny_model_dir):
    """One run of the stage on a briefly trained tiny target, plus the same gate probe on an untrained
    draft of the same shape."""
    from llmray import artifacts
    from llmray.config import build
    from llmray.models.draft import build_draft, save_draft
    from llmray.models.factory import load_pretrained
    from llmray.serving.probe import engine_process, probe
    from llmray.stages.draft import DraftConfig, engine, probe_spec, run

    root = tmp_path_factory.mktemp("draft_stage")
    target_dir = lm_target(tiny_model_dir, root / "target")
    cfg = build(DraftConfig, {**SMALL, "model": str(target_dir), "output": str(root / "draft")})
    target, tok = load_pretrained(target_dir)
    random_dir = save_draft(build_draft(target, cfg.num_layers, "random", seed=1), target_dir, root / "random")
    with engine_process():  # the stage's engines and the random draft's: one vLLM process
        result = run(cfg)
        rand = probe({"random": (str(target_dir), engine(cfg, "draft", random_dir))}, probe_spec(cfg, tok))["random"]
    return {"cfg": cfg, "target": target_dir, "result": result, "manifest": artifacts.read_manifest(cfg.output),
            "random": rand}


def test_trained_draft_accepts_more_than_random_and_keeps_greedy_outputs(draft_run):
    r, rand = draft_run["result"], draft_run["random"]
    spec = r["speculative"]
    trained = spec["acceptance_rate"]["draft"]
    # greedy answers with the draft, and with n-gram prompt lookup, == without speculation
    assert spec["identical"] == {"draft": True, "ngram": True}
    assert rand["draft_tokens"] > 0 and trained is not None
    assert trained >= 0.5, spec
    assert trained >= (rand["acceptance_rate"] or 0.0) + 0.2, (trained, rand["acceptance_rate"])
    assert r["loss_last10"] < 0.7 * r["loss_first10"], r  # distillation learned
    assert r["sequences"] == 64 and r["generated_tokens"] == 64 * 32


def test_gate_decision_is_in_the_manifest_of_a_loadable_draft(draft_run):
    from llmray.serving.speculative import check_draft_tokenizer

    m, cfg = draft_run["manifest"], draft_run["cfg"]
    spec = m.metrics["speculative"]
    assert m.kind == "model" and m.producer == "llmray.stages.draft"
    assert spec["concurrency"] == 1 and spec["min_speedup"] == 1.1
    assert spec["tok_s"]["plain"] > 1 and spec["tok_s"]["draft"] > 1
    speedup = spec["tok_s"]["draft"] / spec["tok_s"]["plain"]
    assert spec["speedups"]["draft"] == pytest.approx(speedup, abs=2e-3)
    # The rule: the fastest candidate measured >= 1.1x with identical outputs, else none (the n-gram
    # candidate can beat a draft that also passes).
    passing = {k: v for k, v in spec["speedups"].items() if v >= 1.1 and spec["identical"][k]}
    assert spec["method"] == (max(passing, key=passing.get) if passing else None), spec
    assert spec["draft_model"] == (cfg.output if spec["method"] == "draft" else None)
    check_draft_tokenizer(draft_run["target"], cfg.output)  # the draft ships the target's tokenizer


def test_bad_config_keys_are_named(tiny_model_dir, tmp_path):
    from llmray.config import ConfigError, build
    from llmray.errors import UserError
    from llmray.stages.draft import DraftConfig, run

    with pytest.raises(ConfigError, match="gate.concurency"):
        build(DraftConfig, {"gate": {"concurency": 1}})
    with pytest.raises(ConfigError, match="gate.min_speedup"):
        build(DraftConfig, {"gate": {"min_speedup": 0}})
    with pytest.raises(ConfigError, match="gate.candidates"):
        build(DraftConfig, {"gate": {"candidates": ["eagle"]}})
    with pytest.raises(ConfigError, match="train.kl_weight"):
        build(DraftConfig, {"train": {"kl_weight": -1}})
    with pytest.raises(ConfigError, match="max_model_len"):
        build(DraftConfig, {"max_model_len": 64})
    with pytest.raises(ConfigError, match="num_layers: must be <= the target's 2 layers"):
        run(build(DraftConfig, {"model": str(tiny_model_dir), "output": str(tmp_path / "d"), "num_layers": 3}))
    with pytest.raises(UserError, match="gate.model"):
        run(build(DraftConfig, {"model": str(tiny_model_dir), "output": str(tmp_path / "d"),
                                "gate": {"model": str(tmp_path / "nowhere")}}))
    assert not (tmp_path / "d").exists()


def test_decide_skips_candidates_whose_greedy_outputs_differ():
    from llmray.serving.gates import decide

    d = decide(100.0, {"draft": 180.0, "ngram": 130.0}, 1.1, identical={"draft": False, "ngram": True})
    assert d["enabled"] == "ngram" and d["identical"] == {"draft": False, "ngram": True}
    assert d["speedups"] == {"draft": 1.8, "ngram": 1.3}
    assert decide(100.0, {"draft": 180.0}, 1.1, identical={"draft": False})["enabled"] is None
    assert decide(100.0, {"draft": 109.0}, 1.1, identical={"draft": True})["enabled"] is None
    assert decide(100.0, {"draft": 180.0}, 1.1)["enabled"] == "draft"  # no equality check asked


def test_speculative_decision_picks_the_fastest_identical_candidate():
    from llmray.serving.gates import speculative_decision

    ans = [[5, 6, 7], [8, 9]]
    res = {"plain": {"tok_s": {"1": 50.0, "8": 300.0}, "answers": ans},
           "draft": {"tok_s": {"1": 90.0, "8": 310.0}, "answers": ans, "acceptance_rate": 0.8},
           "ngram": {"tok_s": {"1": 70.0, "8": 400.0}, "answers": ans, "acceptance_rate": 0.4}}
    d1 = speculative_decision(res, 1, 1.1, 3, "/m/draft")
    assert (d1["method"], d1["num_speculative_tokens"], d1["draft_model"]) == ("draft", 3, "/m/draft")
    assert d1["speedups"] == {"draft": 1.8, "ngram": 1.4} and d1["acceptance_rate"] == {"draft": 0.8, "ngram": 0.4}
    d8 = speculative_decision(res, 8, 1.1, 3, "/m/draft")  # at c=8 only n-gram is 1.1x faster
    assert (d8["method"], d8["draft_model"]) == ("ngram", None)
    res["ngram"]["answers"] = [[5, 6, 7], [8, 1]]
    d8 = speculative_decision(res, 8, 1.1, 3, "/m/draft")
    assert d8["method"] is None and d8["num_speculative_tokens"] is None and d8["identical"]["ngram"] is False


def test_gate_prompts_are_held_out_from_the_training_prompts(tokenizer_dir):
    from llmray.config import build
    from llmray.models.tokenizer import load_tokenizer
    from llmray.stages.draft import DraftConfig, _chat_prompts, _doc_prefixes, held_out_prompts

    tok = load_tokenizer(tokenizer_dir)
    cfg = build(DraftConfig, {"data": {"prompts": 300, "documents": 20}, "gate": {"prompts": 40}})
    held = held_out_prompts(cfg, tok)
    train = _chat_prompts(tok, 300, cfg.data.seed) + _doc_prefixes(tok, 20, cfg.data.seed, 32, None)
    assert len(held) == 40 and not [p for p in held if p in train]
    assert all(8 <= len(p) for p in held)
