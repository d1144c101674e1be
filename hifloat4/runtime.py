"""Facts about this process that both the backend choice and the Triton kernels read."""
from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1: kernels take CPU tensors).
    Triton reads it when a kernel is decorated, so it must be set before triton_kernels is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
