"""Whether the committed ``hstu_pb2.py`` was generated from the current ``hstu.proto``.

``scripts/gen_proto.sh`` appends ``PROTO_SHA256`` (sha256 of the ``.proto`` bytes) to the
generated module; any edit of the ``.proto`` without regenerating changes the digest.
"""

import hashlib
import os
from types import ModuleType
from typing import Optional

from torchrec_hstu.config import hstu_pb2

__all__ = ["PROTO_PATH", "check_generated_code", "proto_sha256"]

#: The schema source, shipped as package data next to the generated module.
PROTO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hstu.proto")


def proto_sha256(path: str = PROTO_PATH) -> str:
    """Hex sha256 of the ``.proto`` file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def check_generated_code(path: str = PROTO_PATH, module: Optional[ModuleType] = None) -> None:
    """Raise ``RuntimeError`` when ``module`` (default ``hstu_pb2``) is stale against ``path``.

    Args:
        path: the ``.proto`` file.
        module: the generated module.
    """
    module = hstu_pb2 if module is None else module
    recorded = getattr(module, "PROTO_SHA256", None)
    actual = proto_sha256(path)
    if recorded != actual:
        raise RuntimeError(
            f"{module.__name__} was generated from a different {os.path.basename(path)} "
            f"(recorded sha256 {recorded}, file has {actual}); run `bash scripts/gen_proto.sh`"
        )
