"""The one object through which the loop meets its environment: rank, device, data, reporting."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from voldit.errors import VolditError
from voldit.training.store import CheckpointStore

# In validation batches: each row's position in the whole validation set (B,) int64, so a stage can give
# every row the same noise whichever worker validates it, and in whichever batch.
VAL_ROW = "row_index"


class TrainingError(VolditError, RuntimeError):
    """A run that cannot go on: bad data, a mismatched checkpoint, a diverged loss."""

    exit_code = 1  # the run started and failed, as distinct from a usage error


@dataclass
class RunContext:
    """What differs between workers and launchers. ``batches(split, batch_size, epoch, shuffle)`` yields
    dicts of tensors from this worker's shard (for "val": its share of the rows, every row on exactly one
    worker, with VAL_ROW); ``report(metrics)`` is called by every worker at the same points
    (checkpoint only from rank 0)."""

    rank: int
    world_size: int
    device: torch.device
    batches: Callable[[str, int, int, bool], Iterable[dict[str, torch.Tensor]]]
    report: Callable[[dict], None]
    run_dir: Path
    resume_from: Path | None = None
    has_validation: bool = True
    # Where rank 0 saves checkpoints: run_dir's own folder, or a remote run folder (uploads behind training).
    checkpoints: CheckpointStore | None = None

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            self.checkpoints = CheckpointStore(self.run_dir)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over workers (a copy; the input is untouched)."""
        value = value.detach().clone().to(self.device)
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def validation_share(
    rows: Iterable[dict], batch_size: int, rank: int, world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Worker ``rank``'s share of the whole validation set, given as ``rows`` in the same order on every
    worker: the rows whose position % world_size == rank, in batches of up to ``batch_size`` with their
    positions as VAL_ROW. Every row is validated exactly once, whatever the number of workers (Ray's
    equal split would drop the remainder)."""
    mine: list[tuple[int, dict]] = []
    for position, row in enumerate(rows):
        if position % world_size == rank:
            mine.append((position, row))
        if len(mine) == batch_size:
            yield _collate(mine)
            mine = []
    if mine:
        yield _collate(mine)


def _collate(rows: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.from_numpy(np.stack([row[key] for _, row in rows])) for key in rows[0][1]}
    batch[VAL_ROW] = torch.tensor([position for position, _ in rows], dtype=torch.int64)
    return batch
