"""The training loop shared by every stage: epochs, logging, validation, checkpoints, resume, divergence."""

from __future__ import annotations

import logging
import math
import time

import torch
from omegaconf import DictConfig

from voldit import flops
from voldit.checkpoint import load_checkpoint
from voldit.training.context import RunContext, TrainingError

log = logging.getLogger(__name__)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Writer:
    """TensorBoard scalars from rank 0 only; other ranks write nothing."""

    def __init__(self, ctx: RunContext) -> None:
        self.writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(ctx.run_dir / "tensorboard"))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(stage, ctx: RunContext, cfg: DictConfig) -> dict:
    """Train ``stage`` to ``training.n_epochs`` (or ``max_steps``), resuming from ``ctx.resume_from``.

    Every worker calls ``ctx.report`` at the same points; before it, rank 0 saves ``latest`` through
    ``ctx.checkpoints`` after each validation, every ``checkpoint_freq`` epochs, every
    ``checkpoint_every_steps`` steps (mid-epoch: a resume skips the epoch's batches already trained on)
    and at the end, with named copies ``best`` (lowest validation loss) and ``epoch_NNNN``.
    """
    t = cfg.training
    epoch, step, best, skip = 0, 0, math.inf, 0
    if ctx.resume_from is not None:
        ckpt = load_checkpoint(ctx.resume_from, stage=stage.stage)
        stage.restore(ckpt)
        epoch, step = ckpt.meta["epoch"], ckpt.meta["step"]
        skip = ckpt.meta.get("epoch_step", 0)  # a mid-epoch checkpoint: batches of this epoch done
        best = ckpt.meta.get("best_val_loss") or math.inf
        if ctx.is_main:
            log.info("resumed from %s at epoch %d, step %d", ctx.resume_from, epoch, step)
    writer = _Writer(ctx)
    checkpoint_freq = t.checkpoint_freq or t.eval_freq
    metrics: dict = {"epoch": epoch, "step": step}
    progress = _Progress(ctx, writer, stage, cfg, start_step=step)
    try:
        while epoch < t.n_epochs and not (t.max_steps and step >= t.max_steps):
            stage.train_mode()
            window, window_start, epoch_steps, stopped = [], time.perf_counter(), 0, False
            epoch_start, epoch_samples = window_start, 0.0
            for batch in ctx.batches("train", t.batch_size, epoch, True):
                if epoch_steps < skip:  # the epoch's order is seeded: these batches were trained on
                    epoch_steps += 1
                    continue
                out = stage.train_step(batch, epoch)
                loss = ctx.all_reduce_sum(out["loss"].float()) / ctx.world_size
                if not torch.isfinite(loss):
                    return _diverged(ctx, epoch, step, float(loss))
                step += 1
                epoch_steps += 1
                window.append((float(loss), float(out["samples"]) * ctx.world_size))
                epoch_samples += window[-1][1]
                if step % t.log_every_n_steps == 0:
                    progress.log(out, window, window_start, epoch, step)
                    window, window_start = [], time.perf_counter()
                if t.max_steps and step >= t.max_steps:
                    stopped = True  # mid-epoch: the checkpoint records where in the epoch
                    break
                if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                    mid = {
                        "epoch": epoch,
                        "step": step,
                        "epoch_step": epoch_steps,
                        "best_val_loss": _finite(best),
                    }
                    _report(stage, ctx, cfg, mid, save=True, aliases=[])
            skip = 0
            if epoch_steps == 0:
                raise TrainingError(
                    f"worker {ctx.rank} got no training batch in epoch {epoch}: the dataset has fewer rows than "
                    f"workers x batch size ({ctx.world_size} x {t.batch_size}) or is empty"
                )
            if not stopped:
                progress.steps_per_epoch = progress.steps_per_epoch or epoch_steps
                stage.end_epoch()
                epoch += 1
            last = stopped or epoch >= t.n_epochs or bool(t.max_steps and step >= t.max_steps)
            metrics = {
                "epoch": epoch,
                "step": step,
                **({"epoch_step": epoch_steps} if stopped else {}),
                "loss": window[-1][0] if window else metrics.get("loss"),
                "lr": stage.lr,
                "samples_per_s": epoch_samples / max(time.perf_counter() - epoch_start, 1e-9),
            }
            if stage.tokens:
                metrics["tokens_per_s"] = metrics["samples_per_s"] * stage.tokens
            if progress.flops:
                metrics["mfu"] = progress.mfu(metrics["samples_per_s"])
            if ctx.has_validation and (epoch % t.eval_freq == 0 or last):
                total, count = stage.validate(ctx.batches("val", t.batch_size, epoch, False))
                total, count = ctx.all_reduce_sum(total), ctx.all_reduce_sum(count)
                if count == 0:
                    raise TrainingError("the validation dataset has no rows")
                metrics["val_loss"] = float(total / count)
                metrics["val_samples"] = int(count)  # every row once, whatever the number of workers
                writer.scalars("val", {"loss": metrics["val_loss"]}, step)
            if "val_loss" in metrics or last:
                progress.epoch_done(metrics)
            improved = metrics.get("val_loss", math.inf) < best
            best = min(best, metrics.get("val_loss", math.inf))
            metrics["best_val_loss"] = _finite(best)
            periodic = not stopped and epoch % checkpoint_freq == 0
            save = last or periodic or "val_loss" in metrics
            aliases = (["best"] if improved else []) + ([f"epoch_{epoch:04d}"] if periodic else [])
            _report(stage, ctx, cfg, metrics, save, aliases)
    finally:
        writer.close()
        if ctx.is_main:
            ctx.checkpoints.publish_logs(ctx.run_dir / "tensorboard")
            ctx.checkpoints.close()  # every upload done before the run counts as finished
    return metrics


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class _Progress:
    """Every ``log_every_n_steps``: the window's mean loss and speed to TensorBoard, and on rank 0 one
    line with the step, loss, speed (and MFU where the device's peak is known) and the time left."""

    def __init__(self, ctx: RunContext, writer: _Writer, stage, cfg: DictConfig, start_step: int) -> None:
        self.ctx, self.writer, self.stage, self.training = ctx, writer, stage, cfg.training
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.steps_per_epoch: int | None = None  # known once an epoch has run
        # Every worker's device is taken to be like this one's (one kind of GPU per training run).
        self.peak = cfg.training.peak_flops or flops.peak_flops(ctx.device)
        self.flops = stage.training_flops() if self.peak else None

    def mfu(self, samples_per_s: float) -> float:
        """``samples_per_s`` summed over the workers, as the progress lines count them."""
        return flops.mfu(samples_per_s, self.flops, self.peak, self.ctx.world_size)

    def _speed(self, samples_per_s: float) -> str:
        return f"{samples_per_s:.2f} samples/s" + (
            f", MFU {self.mfu(samples_per_s):.1%}" if self.flops else ""
        )

    def log(
        self, out: dict, window: list[tuple[float, float]], window_start: float, epoch: int, step: int
    ) -> None:
        seconds = time.perf_counter() - window_start
        values = {
            "loss": sum(v for v, _ in window) / len(window),
            "lr": self.stage.lr,
            "samples_per_s": sum(n for _, n in window) / seconds,
        }
        if self.stage.tokens:
            values["tokens_per_s"] = values["samples_per_s"] * self.stage.tokens
        if self.flops:
            values["mfu"] = self.mfu(values["samples_per_s"])
        values.update({k: float(v) for k, v in out.items() if k not in ("loss", "samples")})
        self.writer.scalars("train", values, step)
        if not self.ctx.is_main:
            return
        t = self.training
        total = t.max_steps or (self.steps_per_epoch * t.n_epochs if self.steps_per_epoch else None)
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        eta = _fmt_eta((total - step) / rate) if total and rate > 0 else "?"
        log.info(
            "[%s] epoch %d/%d step %d%s loss %.5f lr %.3g %s ETA %s",
            self.stage.stage,
            epoch + 1,
            t.n_epochs,
            step,
            f"/{total}" if total else "",
            values["loss"],
            values["lr"],
            self._speed(values["samples_per_s"]),
            eta,
        )

    def epoch_done(self, metrics: dict) -> None:
        """Rank 0: one line after a validation and at the end (the epoch, or max_steps mid-epoch)."""
        if not self.ctx.is_main:
            return
        if "epoch_step" in metrics:
            head = f"stopped at max_steps, step {metrics['step']}"
        else:
            head = f"epoch {metrics['epoch']}/{self.training.n_epochs} done at step {metrics['step']}"
        val = ""
        if "val_loss" in metrics:
            val = f", validation loss {metrics['val_loss']:.6f} over {metrics['val_samples']} samples"
        log.info("[%s] %s: %s%s", self.stage.stage, head, self._speed(metrics["samples_per_s"]), val)


def _report(stage, ctx: RunContext, cfg, metrics: dict, save: bool, aliases: list[str]) -> None:
    """Every worker reports ``metrics``; with ``save``, rank 0 first saves ``latest`` (and ``aliases``)."""
    if save and ctx.is_main:
        payload = stage.checkpoint()
        meta = {
            **payload.pop("meta"),
            "epoch": metrics["epoch"],
            "step": metrics["step"],
            "epoch_step": metrics.get("epoch_step", 0),
            "best_val_loss": metrics.get("best_val_loss"),
            "val_loss": metrics.get("val_loss"),
        }
        ctx.checkpoints.save(aliases, config=cfg, meta=meta, **payload)
        ctx.checkpoints.publish_logs(ctx.run_dir / "tensorboard")
    ctx.report(metrics)


def _diverged(ctx: RunContext, epoch: int, step: int, loss: float) -> dict:
    metrics = {"epoch": epoch, "step": step, "diverged": True, "loss": loss}
    if ctx.is_main:
        log.error(
            "loss is %s at step %d (epoch %d): stopping; the last good checkpoint is kept",
            loss,
            step + 1,
            epoch + 1,
        )
    ctx.report(metrics)
    return metrics
