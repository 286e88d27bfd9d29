"""Data-parallel training on PyTorch's own engine, launched with ``torchrun``.

``torchrun --nproc_per_node N -m lora_project train NAME`` starts N processes; each reads
RANK/WORLD_SIZE from the environment, joins a process group (gloo on CPU, NCCL on CUDA)
and wraps the decoder in ``DistributedDataParallel``, which averages the LoRA gradients
across processes in backward. Every process draws the same global micro-batch of
``batch_size`` sequences and trains on its own disjoint slice (rows rank, rank+N, ...),
so the global batch, the data order and the optimisation are the same whatever N.
Only rank 0 writes adapters, checkpoints, experiment folders and MLflow runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lora_project.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank of this process (world size 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read torchrun's environment variables."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None


def init_distributed(device: str, batch_size: int) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    info = dist_info()
    if not info.enabled:
        return info
    import torch
    import torch.distributed as dist

    if batch_size % info.world_size:
        raise UserError(f"training.batch_size={batch_size} must be divisible by the number of processes "
                        f"({info.world_size}) so that the global batch stays the same")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def wrap_decoder(decoder, device: str, info: DistInfo):
    """Wrap the decoder in DistributedDataParallel (gradients averaged across processes)."""
    if not info.enabled:
        return decoder
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if device == "cuda" else None
    return DistributedDataParallel(decoder, device_ids=ids)


def mean_across(value: float, info: DistInfo) -> float:
    """Mean of a float over all processes."""
    if not info.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    """Wait for every process."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if one was created."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
