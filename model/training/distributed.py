"""Single-process or DDP training context.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes the GPU of its
``LOCAL_RANK`` and BatchNorm becomes SyncBatchNorm (on the CPU, with gloo, each
process keeps its own BatchNorm statistics), the network is wrapped in
``DistributedDataParallel`` and each process reads its shard of every epoch.
Otherwise everything is a no-op around one process. Either way the epoch order
depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, network: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return network
        ids = None
        if self.device.type == "cuda":  # torch syncs BatchNorm statistics on GPUs only
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
            ids = [self.device.index]
        return nn.parallel.DistributedDataParallel(
            network, device_ids=ids, find_unused_parameters=True
        )

    def loader(self, dataset: Dataset, config, collate: Callable) -> DataLoader:
        sampler = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=config.seed
        )
        return DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=config.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=config.num_workers > 0,
        )

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        loader.sampler.set_epoch(epoch)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def context(device: torch.device) -> Context:
    """The context of this process; starts the process group under ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device, dist.get_rank(), world_size)


def is_main_rank() -> bool:
    """Whether this process writes results: rank 0 under ``torchrun``, or alone."""
    return int(os.environ.get("RANK", "0")) == 0


def process_capacity(device: torch.device) -> int:
    """The most training processes this machine runs on ``device``: one a GPU on
    CUDA (each takes the GPU of its ``LOCAL_RANK``), one a core on the CPU."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0))


def gpus_for_ddp() -> int:
    """How many processes ``torchrun`` should start: visible GPUs, when more than one."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count if count > 1 else 0
