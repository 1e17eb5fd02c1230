"""bench/gpu_check.sh, the parts that run without a GPU: the script parses, its arguments are checked,
and every stage config it would run loads with llmray's config loader (`--dry-run`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)


def test_script_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    r = run("--bogus")
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
    if shutil.which("shellcheck"):
        sc = subprocess.run(["shellcheck", "-S", "error", str(SCRIPT)], capture_output=True, text=True, check=False)
        assert sc.returncode == 0, sc.stdout


def test_dry_run_loads_every_stage_config_it_runs():
    r = run("--dry-run")
    lines = [line for line in r.stdout.splitlines() if line.startswith("config ")]
    assert [line.split()[2] for line in lines] == ["pipeline", "pretrain", "ppo", "serve"], r.stdout + r.stderr
    assert r.returncode == 0 and all(line.startswith("config OK") for line in lines), r.stdout
    # The CPU variant with the config's default transport loads everywhere.
    cpu = run("--dry-run", "--cpu", TRANSPORT="")
    assert cpu.returncode == 0 and cpu.stdout.count("config OK") == 4, cpu.stdout + cpu.stderr
