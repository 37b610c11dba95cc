"""Training in many processes (``harness.run.launch``): which process this is, and the few collectives the harness's
own training loops need — PPO's (``methods/ppo.py``) and the round loop's (``harness.train.rounds``). TRL's trainers do
their own through accelerate.

Our own few lines rather than DDP: PPO's step must be the 1-process step exactly (the same micro-batches, their losses
summed), and DDP averages over processes that each run the same number of backward passes. With one process every
function here is a no-op, so single-process runs are untouched.
"""

from __future__ import annotations

from typing import Callable


def process_group() -> tuple[int, int]:
    """(rank, processes) of this process in a multi-process run, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_device() -> str:
    """This process's device in a multi-process run (accelerate's: cuda:<local rank>, or cpu)."""
    from accelerate import PartialState

    return str(PartialState().device)


def broadcast_from_first(value, world: int):
    """``value`` as rank 0 has it, on every process."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(parameters: list, world: int) -> None:
    """Each parameter's gradient summed over the processes (a process that ran no micro-batch adds zeros)."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def summed_stats(stats: dict[str, list[float]], world: int) -> dict[str, tuple[float, int]]:
    """(sum, count) of each logged statistic over every process's micro-batches."""
    local = {key: (sum(values), len(values)) for key, values in stats.items()}
    if world == 1:
        return local
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, local)
    return {key: (sum(p[key][0] for p in parts), sum(p[key][1] for p in parts)) for key in local}


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def on_first(compute: Callable, world: int):
    """``compute()`` run by rank 0 alone, its result sent to every process (sampling, labelling, judging: done once,
    counted once, the same for all)."""
    if world == 1:
        return compute()
    rank, _ = process_group()
    return broadcast_from_first(compute() if rank == 0 else None, world)
