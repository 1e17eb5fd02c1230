"""The eval stage without a server: lm-eval result flattening, the shipped task files, the
multiple-choice documents, served-vs-offline comparison, and config errors that name their key."""

from __future__ import annotations

import random

import pytest

from llmray import config as cfglib
from llmray.config import ConfigError
from llmray.data import tasks
from llmray.errors import UserError


def _rows(n: int) -> list[dict]:
    return [tasks.prompt_record(tasks.make_task(random.Random(i))) for i in range(n)]


def test_flatten_results_drops_filter_names_and_alias():
    from llmray.eval_harness import flatten_results

    raw = {"results": {"llmray_arith": {"alias": "llmray_arith", "exact_match,answer": 0.25,
                                        "exact_match_stderr,answer": "N/A"},
                       "llmray_heldout": {"alias": "x", "word_perplexity,none": 812.5, "bits_per_byte,none": 2.5}},
           "n-samples": {"llmray_arith": {"original": 40, "effective": 40},
                         "llmray_heldout": {"original": 8, "effective": 8}}}
    assert flatten_results(raw) == {"llmray_arith": {"exact_match": 0.25, "n": 40},
                                    "llmray_heldout": {"word_perplexity": 812.5, "bits_per_byte": 2.5, "n": 8}}


def test_mc_docs_hold_the_gold_answer_once_among_four():
    from llmray.eval_harness import arith_mc_docs

    rows = _rows(40)
    docs = arith_mc_docs(rows, render=lambda m: "<|im_start|>user\n" + m[-1]["content"])
    golds = set()
    for row, doc in zip(rows, docs):
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert doc["choices"][doc["gold"]] == f"The answer is {row['answer']}."
        assert sum(tasks.is_correct(row["answer"], c) for c in doc["choices"]) == 1
        golds.add(doc["gold"])
    assert golds == {0, 1, 2, 3}  # the gold position is shuffled
    assert docs == arith_mc_docs(rows, render=lambda m: "<|im_start|>user\n" + m[-1]["content"])  # seeded


def test_task_dir_renders_data_paths_and_loads_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    from llmray.eval_harness import ALL_TASKS, arith_docs, write_task_dir

    d = write_task_dir(tmp_path / "tasks", {"arith": arith_docs(_rows(6)), "arith_mc": [], "heldout": []})
    text = (d / "llmray_arith.yaml").read_text()
    assert "{data_dir}" not in text and str(d) in text
    assert len((d / "arith.jsonl").read_text().splitlines()) == 6
    manager = TaskManager(include_path=str(d), include_defaults=False)
    assert set(ALL_TASKS) <= set(manager.all_tasks)
    task = manager.load(["llmray_arith"])["tasks"]["llmray_arith"]
    docs = list(task.test_docs())
    assert len(docs) == 6 and task.doc_to_target(docs[0]) == _rows(6)[0]["answer"]


def test_compare_flags_a_gap_over_three_points():
    from llmray.stages.eval import compare

    a = [{"answer": "The answer is 3.", "correct": True}] * 100
    b = a[:95] + [{"answer": "x", "correct": False}] * 5
    ok = compare({"served_accuracy": 1.0, "offline_accuracy": 0.98, "served_answers": a, "offline_answers": a})
    assert ok == {"served_offline_gap": 0.02, "served_offline_same_answers": 1.0, "served_matches_offline": True}
    bad = compare({"served_accuracy": 1.0, "offline_accuracy": 0.95, "served_answers": a, "offline_answers": b})
    assert bad["served_matches_offline"] is False and bad["served_offline_same_answers"] == 0.95


def test_shipped_config_loads_and_bad_keys_are_named(tmp_path):
    from llmray.cli import config_path_for
    from llmray.stages.eval import EvalConfig

    path = config_path_for("eval", "tiny_cpu")
    cfg = cfglib.load(EvalConfig, path, ["model=/m"])
    assert cfg.model == "/m" and cfg.lm_eval.tasks == ["llmray_arith", "llmray_arith_mc", "llmray_heldout"]
    with pytest.raises(ConfigError, match="lm_eval.tasks"):
        cfglib.load(EvalConfig, path, ["lm_eval.tasks=[hellaswag]"])
    with pytest.raises(ConfigError, match="lm_eval.nope"):
        cfglib.load(EvalConfig, path, ["lm_eval.nope=1"])
    with pytest.raises(ConfigError, match="endpoint"):
        cfglib.load(EvalConfig, path, ["endpoint=localhost:8000"])
    with pytest.raises(ConfigError, match="offline.backend"):
        cfglib.load(EvalConfig, path, ["offline.backend=sglang"])


def test_missing_model_dir_and_missing_target_are_named(tmp_path):
    from llmray.stages.eval import EvalConfig, run

    with pytest.raises(UserError, match="model"):
        run(EvalConfig(output=str(tmp_path)))
    with pytest.raises(UserError, match=f"model.*{tmp_path / 'nope'}|{tmp_path / 'nope'}.*model"):
        run(EvalConfig(model=str(tmp_path / "nope"), output=str(tmp_path)))
    with pytest.raises(UserError, match="prompts"):
        run(EvalConfig(endpoint="http://127.0.0.1:9/v1", prompts=str(tmp_path / "none"), output=str(tmp_path)))


def test_cli_names_the_missing_model(tmp_path, capsys):
    from llmray.cli import main

    rc = main(["eval", "--config", "jobs/configs/eval/tiny_cpu.yaml", f"model={tmp_path / 'absent'}",
               f"output={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model" in err and "absent" in err
    assert not (tmp_path / "out" / "results.json").exists()
