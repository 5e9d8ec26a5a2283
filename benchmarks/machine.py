"""What the benchmarks print about the machine they ran on."""

import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def command_line() -> str:
    """How this benchmark was run, as BENCHMARKS.md quotes it."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
