"""The thread pool that reads, prepares and writes volumes beside the accelerator."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from voldit.data.nifti import VolumeError


def io_workers() -> ThreadPoolExecutor:
    """Up to 8 threads for volume I/O: reading, checking and preparing a full-size CT or mask, or
    writing a compressed volume, takes a second or more of CPU, so several run at once and beside the
    GPU (numpy, torch, nibabel's decoding and ISA-L release the GIL for the heavy parts). Each worker
    runs torch single-threaded: worker threads with their own OpenMP teams made the calling thread's CPU
    kernels twice as slow."""
    return ThreadPoolExecutor(
        max(1, min(8, os.cpu_count() or 1)),
        thread_name_prefix="voldit-io",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )


def load_rows(
    workers: ThreadPoolExecutor, load: Callable[[dict], object], rows: list[dict]
) -> Iterator[tuple]:
    """``load(row)`` for every row on the pool, in row order: ``(row, result, "")``, or ``(row, None,
    reason)`` for a row whose files are unusable (a VolumeError), so one bad row fails only itself."""

    def attempt(row: dict) -> tuple:
        try:
            return row, load(row), ""
        except VolumeError as error:
            return row, None, str(error)

    return workers.map(attempt, rows)
