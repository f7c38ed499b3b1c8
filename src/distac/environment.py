"""What ran where: versions and machine facts recorded next to every result."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

import distac


def environment_record() -> dict[str, Any]:
    import transformers

    return {
        "distac": distac.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
