"""The run report: stages in the table, the run's peak memory in its own line, not as a stage."""

from __future__ import annotations


def test_report_separates_the_run_from_its_stages(tmp_path):
    from llmray.stages.pipeline import Paths
    from llmray.report.run_report import RUN_KEY, write_report

    results = {
        "pretrain": {"final_loss": 5.2, "heldout_ppl": 185.8, "task_accuracy": 0.0, "elapsed_s": 228.0},
        "sft": {"final_loss": 0.25, "heldout_ppl": 900.0, "task_accuracy": 0.355, "elapsed_s": 219.8},
        RUN_KEY: {"peak_memory_gib": 5.46, "start_memory_gib": 1.1, "stage_seconds": {"pretrain": 228.0, "sft": 219.8}},
    }
    text = write_report(Paths(tmp_path / "w"), results).read_text()
    assert "Peak memory in use on the machine: 5.46 GiB (1.1 GiB at the start)" in text
    assert "Stages run this time: 448 s" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| pretrain | ") for r in rows) and any(r.startswith("| sft | 900 | 0.355 |") for r in rows)
    assert not any(r.startswith(f"| {RUN_KEY} ") for r in rows)
    assert (tmp_path / "w" / "report" / "summary.png").stat().st_size > 0


def test_report_shows_rl_restarts_and_monitor_warnings(tmp_path):
    from llmray.report.run_report import write_report
    from llmray.stages.pipeline import Paths

    warning = ("possible reward hacking: training reward rose 0.217 -> 0.475 (steps 4 -> 8) while held-out "
               "accuracy fell 0.310 -> 0.220")
    results = {"ppo": {"steps": 8, "task_accuracy": 0.22, "restarts": 3, "rollout_restarts": 1,
                       "trainer_restarts": 1, "reward_hacking_warnings": [warning]}}
    text = write_report(Paths(tmp_path / "w"), results).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ppo | — | steps=8;"))
    assert "restarts=3" in row and "rollout_restarts=1" in row and "trainer_restarts=1" in row
    assert f"- ppo: {warning}" in text
