"""Where a run's checkpoints go: ``<run>/checkpoints/latest``, ``best`` and ``epoch_NNNN``, in a local
folder or a remote (s3://) run folder.

A remote run writes each checkpoint once to local staging and uploads it once, in a background thread,
while training goes on: the GPUs wait only for the local write. The named copies (``best``,
``epoch_NNNN``) are made in the bucket from the uploaded ``latest`` (server-side copies, no second
upload), and the staging copy is deleted once uploaded, so local disk holds at most two checkpoints.
Every remote checkpoint gets its ``meta.json`` last: a checkpoint without one is incomplete.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from voldit import storage
from voldit.checkpoint import copy_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class CheckpointStore:
    """Rank 0's checkpoints of one run. ``save`` returns once the checkpoint is on local disk."""

    def __init__(self, run_dir: str | Path, remote: str | None = None) -> None:
        self.run_dir, self.remote = Path(run_dir), remote
        self.folder = self.run_dir / "checkpoints"
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="voldit-upload") if remote else None
        self._pending: Future | None = None

    def save(self, aliases: list[str], **checkpoint) -> None:
        """Write ``latest`` (keyword arguments of `save_checkpoint`) and the ``aliases`` (e.g. best,
        epoch_0004) as copies of it."""
        if not self.remote:
            latest = save_checkpoint(self.folder / "latest", **checkpoint)
            for alias in aliases:
                copy_checkpoint(latest, self.folder / alias)
            return
        self.wait()  # at most one upload in flight: staging holds one checkpoint being uploaded, one new
        staged = save_checkpoint(self.folder / f".upload-{checkpoint['meta']['step']:09d}", **checkpoint)
        self._pending = self._uploads.submit(self._upload, staged, aliases)

    def publish_logs(self, folder: Path) -> None:
        """Upload a log folder (TensorBoard) behind any checkpoint upload; a no-op for local runs."""
        if self.remote and folder.is_dir():
            dest = storage.join(self.remote, folder.relative_to(self.run_dir).as_posix())
            self._uploads.submit(storage.sync_dir, folder, dest)

    def wait(self) -> None:
        """Block until the uploads so far are complete; raise the error of one that failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)

    def _upload(self, staged: Path, aliases: list[str]) -> None:
        latest = storage.join(self.remote, "checkpoints", "latest")
        storage.put_dir(staged, latest)
        for alias in aliases:
            storage.copy_dir(latest, storage.join(self.remote, "checkpoints", alias))
        shutil.rmtree(staged, ignore_errors=True)
        log.debug("uploaded %s to %s (and %s)", staged.name, latest, ", ".join(aliases) or "no alias")

    def resume_point(self, scratch: Path) -> Path | None:
        """The newest complete checkpoint of this run as a local directory, or None for a new run.

        Locally that is ``latest``. Remotely it is ``latest`` when complete; after a node died in the
        middle of uploading it, the newest complete one of ``best`` and ``epoch_NNNN`` by step.
        """
        if not self.remote:
            latest = self.folder / "latest"
            return latest if (latest / storage.MARKER).is_file() else None
        storage.filesystem(self.remote)[0].invalidate_cache()  # listings cached by s3fs may be stale
        markers = storage.glob(storage.join(self.remote, "checkpoints", "*", storage.MARKER))
        if not markers:
            return None
        steps = {m: json.loads(storage.read_text(m)).get("step", -1) for m in markers}
        newest = max(markers, key=lambda m: (steps[m], m.endswith(f"/latest/{storage.MARKER}")))
        source = newest[: -len(storage.MARKER) - 1]
        log.info("resuming from %s (step %d)", source, steps[newest])
        return storage.get_dir(source, scratch)
