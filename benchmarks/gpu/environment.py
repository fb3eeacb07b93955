"""The machine a run happened on, as JSON: device, driver, versions, date (benchmarks/gpu/run.sh)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch


def _command(*args: str) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> dict:
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "git_commit": _command("git", "rev-parse", "HEAD"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            nvidia_smi=_command(
                "nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"
            ),
        )
    return info


if __name__ == "__main__":
    json.dump(describe(), sys.stdout, indent=1)
    print()
