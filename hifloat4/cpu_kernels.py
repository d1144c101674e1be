"""C++ CPU kernels for HiF4 (csrc/hif4_cpu.cpp), built on first use with torch's JIT.

Why: the torch implementation in format.py needs ~50 tensor ops per chunk, and on
a 2-core CPU their per-op overhead caps it near 2x the naive transcription. One
C++ pass per group is ~10x faster. Building needs a C++ compiler and ninja; where
either is missing the torch implementation (same bits, tested against each
other) is used and a warning says why. Built once per machine, then cached by
torch (TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("csrc") / "hif4_cpu.cpp"


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The compiled extension, or None (with one warning) if it cannot be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import load as jit_load

        # One build per torch installation: two venvs sharing torch's extension cache
        # under one name would rebuild it in turn (and wait on each other's lock).
        tag = hashlib.sha256(f"{torch.__file__}:{torch.__version__}".encode()).hexdigest()[:10]
        return jit_load(name=f"hifloat4_cpu_v1_{tag}", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, read-only cache dir...
        warnings.warn(f"hifloat4: C++ CPU kernels unavailable ({type(e).__name__}: {e}); "
                      "using the torch implementation (same results, slower)", RuntimeWarning, stacklevel=2)
        return None
