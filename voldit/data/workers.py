"""The thread pool that reads, prepares and writes volumes beside the accelerator."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch


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
