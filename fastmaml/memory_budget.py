"""How much memory a call may take: the probes behind ``MAML(memory_budget=...)`` (task chunks) and
``MAML(store_budget=...)`` (what store mode keeps for the reverse pass).

Both defaults are fractions of what is free when the call starts, so that a meta-step sized by them
leaves room for the rest of the process: the caching allocator's unused blocks count as free on CUDA.
"""

from __future__ import annotations

import torch

__all__ = ["available_bytes", "default_memory_budget", "default_store_budget", "STORE_BUDGET_FRACTION"]

# store mode keeps iterates and HVP states up to this fraction of the available memory (docs/design.md,
# "Memory"); peak memory then stays below that much above the K = 1 peak, whatever K is
STORE_BUDGET_FRACTION = 0.25


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA, free plus what torch's caching allocator holds unused; the CPU,
    ``MemAvailable`` (Linux), else 8 GiB (an assumption where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_memory_budget(device: torch.device) -> int:
    """``task_chunk="auto"``'s default: 80% of the free CUDA memory, 50% of the available CPU memory."""
    return int((0.8 if device.type == "cuda" else 0.5) * available_bytes(device))


def default_store_budget(device: torch.device) -> int:
    """Store mode's default: ``STORE_BUDGET_FRACTION`` of the available memory on ``device``."""
    return int(STORE_BUDGET_FRACTION * available_bytes(device))
