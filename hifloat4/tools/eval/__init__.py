"""`python -m hifloat4 eval`: quality evidence for Tail-Aware HiFloat4.

Modules: cli (the command), wan_eval (tiny Wan2.2 pair), real_model (a pretrained
transformer from the optional `.[eval]` extra), formats (reference NVFP4 / MXFP4 /
INT4 quantizers), format_eval (HiF4 against them), massive (a pair with token-wise
massive activations), methods, report (tables, plots).
"""
from __future__ import annotations


def main(argv=None) -> int:
    from .cli import main as _main  # lazy: `import hifloat4.eval.formats` stays light

    return _main(argv)
