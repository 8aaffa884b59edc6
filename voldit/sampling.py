"""From checkpoints to CT volumes: a VolDiT (or TGCA) checkpoint and its VQ-GAN, loaded once, sampled
in batches with one seed per volume, decoded (whole or in tiles) and mapped back to Hounsfield units.

Everything a sampler needs comes from the checkpoints: the scale factor and latent shape from the
diffusion checkpoint's metadata, the image size from its config, the VQ-GAN from its provenance.
No Ray here: `voldit sample` runs it in-process and `voldit synthesize` runs it inside Ray actors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from voldit import storage
from voldit.builders import build_schedule, model_from_checkpoint, vqgan_factor
from voldit.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from voldit.data.intensity import unit_to_hu_int16
from voldit.data.preprocess import Grid
from voldit.diffusion.graphs import GraphedDenoiser
from voldit.diffusion.samplers import SAMPLERS, classifier_free, sample
from voldit.encode import default_device
from voldit.models.decoding import DEFAULT_HALO, decode, decode_tiled
from voldit.precision import PRECISIONS, autocast

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "direct", "tiled")


@dataclass(frozen=True)
class SamplingSettings:
    """How volumes are drawn. Recorded with every output: a re-run with other settings is refused."""

    sampler: str = "ddpm"
    steps: int = 300  # the paper samples with DDPM over all 300 training steps
    eta: float = 0.0  # DDIM's noise (0: deterministic); the other samplers have none, so it stays 0 for them
    guidance: float = 1.0  # classifier-free guidance scale; 1.0 is the plain conditional model
    precision: str = "auto"  # autocast dtype; auto: bf16 on GPU, none on CPU
    decode: str = "auto"  # auto: whole volume, in tiles if that runs out of memory
    decode_tile: int = 16  # latent voxels per tile axis (x8 image voxels for the ds8 VQ-GAN)
    cuda_graphs: bool = False  # replay the denoiser from CUDA graphs (GPU only; pays for small models)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(
                f"eta is DDIM's noise; the {self.sampler} sampler takes none, so leave eta at 0 (got {self.eta})"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.decode_tile < 1:
            raise ValueError(f"decode_tile must be at least 1, got {self.decode_tile}")

    def recorded(self) -> dict:
        """The settings that change a volume (precision and decode mode only change the last bits)."""
        return {k: v for k, v in asdict(self).items() if k in ("sampler", "steps", "eta", "guidance")}


def fingerprint(path: str | Path) -> str:
    """A short id of a checkpoint's content: its metadata and the head of its weights."""
    path = Path(path)
    digest = hashlib.sha256((path / "meta.json").read_bytes())
    weights = path / "model.safetensors"
    digest.update(str(weights.stat().st_size).encode())
    with open(weights, "rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def resolve_vqgan(diffusion: Checkpoint, vqgan: str | Path | None) -> Checkpoint:
    """The VQ-GAN to decode with: the one given, else the one the diffusion model's latents came from."""
    source = vqgan or diffusion.meta.get("vqgan_checkpoint")
    if not source:
        raise CheckpointError(
            f"checkpoint {diffusion.path} does not record which VQ-GAN made its latents; pass --vqgan"
        )
    try:
        return load_checkpoint(source, stage="vqgan")
    except CheckpointError as error:
        if vqgan:
            raise
        raise CheckpointError(f"{error} (recorded by {diffusion.path}); pass --vqgan") from None


def seed_for(row_id: str, base_seed: int = 0) -> int:
    """A row's default seed: stable across runs, machines and row order."""
    return int(hashlib.sha256(f"{base_seed}:{row_id}".encode()).hexdigest()[:15], 16)


class Pipeline:
    """A diffusion checkpoint (VolDiT or TGCA, EMA weights when present) with its VQ-GAN, ready to
    turn seeds (and, for TGCA, conditions) into volumes in [-1, 1] at the model's image size."""

    def __init__(
        self,
        checkpoint: str | Path,
        vqgan: str | Path | None = None,
        settings: SamplingSettings | None = None,
        device: str | torch.device | None = None,
        stage: str | None = None,
    ) -> None:
        self.settings = settings or SamplingSettings()
        self.device = torch.device(device) if device else default_device()
        self.checkpoint = load_checkpoint(checkpoint, stage=stage)
        if self.checkpoint.stage not in ("dit", "tgca"):
            raise CheckpointError(
                f"{checkpoint} is a {self.checkpoint.stage} checkpoint; sampling needs a dit or tgca one"
            )
        meta = self.checkpoint.meta
        if not meta.get("scale_factor") or not meta.get("latent_shape"):
            raise CheckpointError(f"checkpoint {checkpoint} lacks scale_factor/latent_shape in meta.json")
        self.scale_factor = float(meta["scale_factor"])
        self.latent_shape = [int(n) for n in meta["latent_shape"]]
        self.vqgan_checkpoint = resolve_vqgan(self.checkpoint, vqgan)
        cfg = self.checkpoint.config
        self.grid = Grid.of(cfg)  # the grid the model was trained on (its latents' spacing and orientation)
        self.roi_size = list(self.grid.roi_size)
        self.factor = vqgan_factor(self.vqgan_checkpoint.config)
        expected = [n // self.factor for n in self.roi_size]
        if expected != self.latent_shape[1:]:
            raise CheckpointError(
                f"the VQ-GAN {self.vqgan_checkpoint.path} turns {self.roi_size} images into latents of "
                f"{expected}, but {checkpoint} was trained on {self.latent_shape[1:]}"
            )
        self.conditional = self.checkpoint.stage == "tgca"
        self.condition_keys = list(cfg.tgca.condition_keys) if self.conditional else []
        self.condition_labels: dict[str, list[int] | None] = meta.get("condition_labels") or {}
        self.model = model_from_checkpoint(self.checkpoint).to(self.device)
        self.vq = model_from_checkpoint(self.vqgan_checkpoint).to(self.device)
        self._denoise = None
        self.schedule = build_schedule(cfg)
        self.ids = {
            "checkpoint": fingerprint(self.checkpoint.path),
            "vqgan": fingerprint(self.vqgan_checkpoint.path),
        }

    def autocast(self):
        return autocast(self.settings.precision, self.device)

    @torch.no_grad()
    def sample_latents(
        self, seeds: list[int], condition: torch.Tensor | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Unscaled latents (B, C, d, h, w) for B seeds; TGCA needs the condition (B, K, *roi_size).

        Each volume's noise comes from its own CPU generator, so a seed gives the same volume whatever
        the batch it is drawn in (up to floating-point summation order).
        """
        s = self.settings
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        shape = (len(seeds), *self.latent_shape)
        with self.autocast():
            if self.conditional:
                if condition is None:
                    raise ValueError("a TGCA checkpoint samples conditionally: pass the masks")
                # The condition's features do not depend on the timestep: computed once, not per step.
                cond = {"features": self.model.condition_features(condition.to(self.device))}
            else:
                cond = {}
            latents = sample(
                self._denoiser(condition),
                self.schedule,
                shape,
                generators,
                sampler=s.sampler,
                steps=s.steps,
                eta=s.eta,
                device=self.device,
                progress=progress,
                **cond,
            )
        return latents.float() / self.scale_factor

    def _denoiser(self, condition: torch.Tensor | None):
        """The network as the sampler calls it, built once: guidance with the empty condition's features
        (computed once), replayed from CUDA graphs when the settings ask for them."""
        if self._denoise is None:
            if self.conditional:
                empty = torch.zeros_like(condition[:1], device=self.device)
                null = self.model.condition_features(empty)

                def denoise(x, t, features):
                    return self.model(x, t, features=features)

                denoise = classifier_free(denoise, self.settings.guidance, unconditional={"features": null})
            else:
                denoise = self.model
            if self.settings.cuda_graphs and self.device.type == "cuda":
                denoise = GraphedDenoiser(denoise)
            self._denoise = denoise
        return self._denoise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, d, h, w) -> images (B, *roi_size) in [-1, 1] (float32, on the CPU), one
        volume at a time: a full-size decode needs far more memory than sampling."""
        with self.autocast():
            return torch.cat([self._decode_one(z[None].to(self.device)) for z in latents])

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        mode = self.settings.decode
        if mode != "tiled":
            try:
                return decode(self.vq, z).float().clamp(-1, 1)[:, 0].cpu()
            except torch.OutOfMemoryError:
                if mode == "direct":
                    raise
                torch.cuda.empty_cache()
                log.warning("whole-volume decode ran out of memory; decoding in tiles")
        image = decode_tiled(self.vq, z, self.factor, self.settings.decode_tile, DEFAULT_HALO)
        return image.clamp(-1, 1)[:, 0]

    def volumes(self, seeds: list[int], condition: torch.Tensor | None = None) -> list[np.ndarray]:
        """int16 HU volumes (*roi_size), one per seed, for unconditional sampling."""
        images = self.decode(self.sample_latents(seeds, condition))
        return [unit_to_hu_int16(image) for image in images]


def epoch_checkpoints(run_dir: str | Path, start: int, end: int, step: int = 1) -> list[tuple[int, str]]:
    """The periodic checkpoints ``<run>/checkpoints/epoch_NNNN`` (a folder or an s3:// prefix) for epochs
    start, start+step, ..., end (the seed's epoch-range sampling); every one asked for must exist."""
    folder = storage.join(run_dir, "checkpoints")
    wanted = list(range(start, end + 1, step))
    if not wanted:
        raise CheckpointError(f"no epochs in {start}..{end} by {step}")
    complete = {
        name: storage.join(folder, name)
        for name in (Path(p).parent.name for p in storage.glob(storage.join(folder, "epoch_*", "meta.json")))
    }
    missing = [e for e in wanted if f"epoch_{e:04d}" not in complete]
    if missing:
        have = sorted(int(n[6:]) for n in complete if n[6:].isdigit())
        raise CheckpointError(
            f"{folder} has no checkpoint for epoch(s) {missing[:10]}; it has epochs {have or 'none'} "
            "(periodic checkpoints are kept every training.checkpoint_freq epochs)"
        )
    return [(e, complete[f"epoch_{e:04d}"]) for e in wanted]


def _sample_affine(grid: Grid, reference: np.ndarray | None) -> np.ndarray:
    """Where unconditional samples lie: the grid's axes and spacing when it has them (the voxels come
    out in the grid's orientation), the reference's voxel sizes where the grid keeps each file's own."""
    if not grid.orientation and not grid.spacing:  # the stored order: the reference's own geometry
        return reference if reference is not None else np.eye(4)
    sizes = None
    if reference is not None and grid.orientation:
        import nibabel as nib

        zooms = np.linalg.norm(reference[:3, :3], axis=0)
        move = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(reference), nib.orientations.axcodes2ornt(grid.orientation)
        )
        sizes = [0.0, 0.0, 0.0]
        for axis, (target, _) in enumerate(move):
            sizes[int(target)] = float(zooms[axis])
    return grid.affine(sizes)


def write_samples(
    checkpoint: str | Path,
    output: str | Path,
    n_samples: int,
    seed: int = 0,
    vqgan: str | Path | None = None,
    settings: SamplingSettings | None = None,
    batch_size: int = 4,
    reference: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[Path | str]:
    """Draw ``n_samples`` unconditional volumes from a VolDiT checkpoint into ``output`` (a folder or an
    s3:// prefix) as int16 HU
    NIfTI (``sample_NNN.nii.gz``, sample k seeded ``seed + k``) with a preview PNG each.

    The affine is the model grid's (its orientation and spacing; the ``reference`` NIfTI's voxel sizes, e.g.
    a training CT's, where the grid keeps each file's own, else 1 mm), or the reference's own when the
    model reads volumes in their stored order.
    """
    from tqdm.auto import tqdm

    from voldit.data.nifti import read_volume, write_volume
    from voldit.previews import preview, save_png

    pipeline = Pipeline(checkpoint, vqgan, settings, device, stage="dit")
    affine = _sample_affine(pipeline.grid, read_volume(reference).affine if reference else None)
    remote = str(output) if storage.is_remote(output) else None
    with tempfile.TemporaryDirectory(prefix="voldit-samples-") as staging:
        folder = Path(staging) if remote else Path(output)  # a remote output is staged, then uploaded
        written = []
        for start in tqdm(range(0, n_samples, batch_size), desc="sample", unit="batch", disable=not progress):
            seeds = list(range(seed + start, seed + min(start + batch_size, n_samples)))
            for k, volume in zip(seeds, pipeline.volumes(seeds), strict=True):
                name = f"sample_{k - seed:03d}"
                path = write_volume(folder / f"{name}.nii.gz", volume, affine)
                save_png(
                    preview(volume, affine, title=f"{name} (seed {k})"), folder / "previews" / f"{name}.png"
                )
                written.append(storage.join(remote, path.name) if remote else path)
        meta = {
            "checkpoint": storage.resolve(checkpoint),
            "checkpoint_id": pipeline.ids["checkpoint"],
            "vqgan": str(pipeline.vqgan_checkpoint.path.resolve()),
            "vqgan_id": pipeline.ids["vqgan"],
            "seeds": [seed, seed + n_samples - 1],
            **asdict(pipeline.settings),
        }
        storage.write_text(folder / "samples.json", json.dumps(meta, indent=2))
        if remote:
            storage.sync_dir(folder, remote)
    return written
