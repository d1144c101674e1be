"""`python -m hifloat4 {demo,inspect,bench,gpucheck,export,eval}`: dispatch to each tool's main(argv).

The tools live in hifloat4.tools (export is the library's own writer, hifloat4.export).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("hifloat4.tools.demo", "tiny Wan2.2 end to end: calibrate, save, reload, W4A4, compare"),
    "inspect": ("hifloat4.tools.inspect_state", "show and validate a PTQ state file"),
    "bench": ("hifloat4.tools.bench", "speed and memory of the HiF4 kernels on this machine"),
    "gpucheck": ("hifloat4.tools.gpucheck", "bit-exactness, sync-freedom, speed and memory of the GPU path"),
    "export": ("hifloat4.export", "write a Wan2.2 expert with packed HiF4 main weights"),
    "eval": ("hifloat4.tools.eval", "quality evaluation: tail-aware vs max vs none, formats, a real model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m hifloat4 {" + ",".join(COMMANDS) + "} ...\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
