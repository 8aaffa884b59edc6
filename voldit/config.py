"""The one config schema: OmegaConf structured dataclasses in the seed's YAML layout, validated once.

A config file holds any of the sections ``stage1`` (+ ``discriminator``, ``perceptual_network``), ``dit``
and ``tgca``, plus ``training`` and ``optim``. Several files merge left to right, so a DiT config and a
TGCA config can be given together, as the seed's scripts take them. Every default lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from voldit.diffusion.schedule import PREDICTION_TYPES, SCHEDULES
from voldit.errors import VolditError
from voldit.models.attention import BACKENDS
from voldit.precision import MODES as PRECISION_MODES
from voldit.qc import RETRIES as QC_RETRIES
from voldit.qc import QCThresholds
from voldit.qc import parse as qc_parse

STAGES = ("vqgan", "dit", "tgca")
SEED_NUM_WORKERS = 4  # training.num_workers in the authors' files: accepted so they load, never read


class ConfigError(VolditError, ValueError):
    """A config value that cannot work; the message names the key and what to change."""


@dataclass
class Stage1Params:
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    num_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    num_res_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    num_res_layers: int = 2
    # (stride, kernel, dilation, padding) per level: three stride-2 levels compress 8x per axis.
    downsample_parameters: list[list[int]] = field(default_factory=lambda: [[2, 4, 1, 1]] * 3)
    upsample_parameters: list[list[int]] = field(default_factory=lambda: [[2, 4, 1, 1, 0]] * 3)
    num_embeddings: int = 4096  # codebook size
    embedding_dim: int = 8  # latent channels
    commitment_cost: float = 0.25
    decay: float = 0.99  # EMA codebook decay (MONAI's default is 0.5)
    epsilon: float = 1e-5
    ddp_sync: bool = True  # all-reduce codebook statistics so DDP workers share one codebook


@dataclass
class Stage1:
    base_lr: float = 5e-5  # generator learning rate
    disc_lr: float = 2e-5  # discriminator learning rate
    perceptual_weight: float = 0.005  # needs downloaded LPIPS weights; 0 turns it off
    adv_weight: float = 0.005
    adv_warmup_epochs: int = 10  # epochs of reconstruction-only training before the adversary switches on
    jukebox_weight: float = 0.0  # optional spectral loss
    params: Stage1Params = field(default_factory=Stage1Params)


@dataclass
class DiscriminatorParams:
    spatial_dims: int = 3
    num_channels: int = 64
    num_layers_d: int = 3
    in_channels: int = 1
    out_channels: int = 1


@dataclass
class Discriminator:
    params: DiscriminatorParams = field(default_factory=DiscriminatorParams)


@dataclass
class PerceptualParams:
    spatial_dims: int = 3
    network_type: str = "squeeze"


@dataclass
class PerceptualNetwork:
    params: PerceptualParams = field(default_factory=PerceptualParams)


@dataclass
class DiTParams:
    input_size: list[int] = field(default_factory=lambda: [64, 64, 32])  # latent (D, H, W)
    patch_size: int = 4  # 2 or 4: tokens = prod(input_size) / p^3
    in_channels: int = 8  # latent channels of the VQ-GAN
    hidden_size: int = 1152
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # after the attention projection and in the MLP, as the authors trained
    # On the attention weights. The authors' blocks declare 0.1 here too, but their configs run xformers'
    # memory_efficient_attention, called without `p`: their published models were trained with none. 0 also
    # spares the fused attention kernels a dropout mask (cuDNN at L/4's shape, H100: 1.89 ms, 2.74 with 0.1).
    attention_dropout: float = 0.0
    attention: str = "sdpa"  # sdpa (PyTorch picks) | flash | cudnn | efficient (pinned) | xformers | math
    # Seed keys, accepted so existing files load: class conditioning is not part of VolDiT, and
    # flash_attention is served by SDPA's flash kernels.
    class_dropout_prob: float = 0.0
    num_classes: int = 0
    learn_sigma: bool = False
    flash_attention: bool = True


@dataclass
class DiTScheduler:
    schedule: str = "cosine"
    num_train_timesteps: int = 300
    prediction_type: str = "v_prediction"


@dataclass
class DiT:
    params: DiTParams = field(default_factory=DiTParams)
    scheduler: DiTScheduler = field(default_factory=DiTScheduler)


@dataclass
class TGCAParams:
    condition_channels: int = 1  # channels after stacking the condition keys
    inject_layers: int | None = None  # null: every block; N: the last N blocks
    finetune_last_n_blocks: int = 0  # also train the last N base blocks and the final layer
    # Condition dropout, which classifier-free guidance learns from, drawn per training sample: the whole
    # condition is zeroed with condition_dropout_prob (p); of the samples that keep it, each channel is
    # zeroed with channel_dropout_prob (q), so the adapter also learns from subsets of the masks. A sample is
    # unconditional with probability p + (1 - p) * q^C for C channels: exactly p with q = 0. The authors'
    # model uses q = 0.1, and their trainer first zeroes each condition key with training.condition_dropout
    # (per batch; voldit applies no second draw): 27.1% unconditional for one mask at 0.1 and 0.1, which
    # p = 0.1, q = 0.19 reproduces for one-channel keys.
    condition_dropout_prob: float = 0.1
    channel_dropout_prob: float = 0.0


@dataclass
class QualityGate:
    """`voldit synthesize`'s quality gate for this TGCA's volumes (voldit.qc, which documents the
    defaults); the --qc/--no-qc and --qc-* flags override each key for one run."""

    enabled: bool = False  # gate every synthesis with this checkpoint, as --qc does
    min_voxels: int = QCThresholds.min_voxels  # labels with fewer voxels in the view are not judged
    min_inside: float = QCThresholds.min_inside  # share of a label's voxels in the real 5-95% HU range
    retries: int = QC_RETRIES  # samplings with the next seed after a failed gate


@dataclass
class TGCA:
    condition_keys: list[str] = field(default_factory=lambda: ["mask"])
    params: TGCAParams = field(default_factory=TGCAParams)
    qc: QualityGate = field(default_factory=QualityGate)


@dataclass
class Training:
    n_epochs: int = 1000
    eval_freq: int = 50  # epochs between validations
    batch_size: int = 2  # per worker
    roi_size: list[int] = field(default_factory=lambda: [512, 512, 256])  # image crop (X, Y, Z) in voxels
    # The model's grid, set in the VQ-GAN config: images and masks are reoriented to `orientation` (axis
    # codes; null keeps the stored voxel order) and resampled to `spacing` (mm per axis; null keeps each
    # file's own) before the crop. Latents and checkpoints record both: the VolDiT and TGCA take them
    # from their latents (or the VQ-GAN), synthesis from the TGCA checkpoint.
    spacing: list[float] | None = None
    orientation: str | None = "RAS"
    # null: the data decides (a latent folder from `voldit encode`, or a CSV of images with --vqgan to
    # encode online); true or false (seed key) makes `voldit train` insist on latents or on online encoding.
    use_precomputed_latents: bool | None = None
    scale_factor: float | None = None  # null: taken from the latent dataset (1 / std of the latents)
    use_ema: bool = True
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    checkpoint_freq: int | None = None  # epochs between periodic checkpoints; null: eval_freq
    # Steps between mid-epoch checkpoints of `latest` (null: none). A long epoch on spot GPUs then loses
    # at most this many steps when a node disappears; the resume is exact (the epoch's batch order is seeded).
    checkpoint_every_steps: int | None = None
    log_every_n_steps: int = 10  # metrics to TensorBoard and the progress line
    shuffle_buffer: int = 16  # rows in each worker's local shuffle buffer
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests, sweeps)
    mixed_precision: str = "bf16"  # bf16 | fp16 | no; only used on GPU
    # torch.compile each transformer block (H200, L/4 batch 8: +22% samples/s; the same predictions, tested
    # on CPU); null: on when training on a GPU, off on CPU (compiling costs more there than it saves).
    compile: bool | None = None
    # The accelerator's dense bf16 FLOP/s for the MFU in the progress lines; null: known GPUs (H100, H200,
    # A100), none elsewhere.
    peak_flops: float | None = None
    seed: int = 0
    # Random rotation, flip and crop of training volumes (not seeded: Ray Data draws them per task);
    # false trains on the centre crop, as validation reads, and a seeded run then repeats exactly on CPU.
    augment: bool = True
    # Seed keys. condition_dropout duplicates tgca.params.condition_dropout_prob (it may only repeat it);
    # the caching keys belonged to MONAI datasets, which Ray Data streaming replaces. num_workers was the
    # reference's DataLoader processes per GPU: Ray Data reads with the cluster's CPUs, and the number of
    # training workers is `voldit train --workers`; only the seed files' value 4 is accepted, so they load.
    num_workers: int | None = None
    condition_dropout: float | None = None
    spatial_dropout_prob: float = 0.0
    spatial_dropout_patch_size: int = 16
    cache: bool = False
    persistent: bool = False
    use_persistent: bool = False
    cache_rate: float = 0.0


@dataclass
class Optim:
    lr: float = 1e-4
    lr_gamma: float = 0.999  # exponential decay per epoch
    weight_decay: float = 0.01  # AdamW
    fused: bool = True  # fused AdamW kernel: one kernel for every tensor, the same update (tested)


@dataclass
class Config:
    stage1: Stage1 | None = None
    discriminator: Discriminator | None = None
    perceptual_network: PerceptualNetwork | None = None
    dit: DiT | None = None
    tgca: TGCA | None = None
    training: Training = field(default_factory=Training)
    optim: Optim = field(default_factory=Optim)


# The seed's per-stage defaults for training and optim, applied beneath the user's files.
_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqgan": {"training": {"n_epochs": 1300, "eval_freq": 10, "batch_size": 4}},
    "dit": {},
    "tgca": {"training": {"n_epochs": 500, "eval_freq": 25}, "optim": {"lr": 5e-5}},
}


def stage_of(cfg: DictConfig | dict) -> str:
    """The stage a config trains: tgca if it has a tgca section, else dit, else vqgan."""
    for section, stage in (("tgca", "tgca"), ("dit", "dit"), ("stage1", "vqgan")):
        if cfg.get(section) is not None:
            return stage
    raise ConfigError("config has none of the sections stage1, dit or tgca: nothing to build")


def _merge(layers: list[Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), *layers)
    except ConfigKeyError as error:
        raise ConfigError(
            f"{source}: unknown key {error.full_key!r}; check its spelling (`voldit config show` lists every key)"
        ) from None
    except ValidationError as error:
        raise ConfigError(
            f"{source}: {error.full_key!r} has a value of the wrong type ({error.msg.splitlines()[0]})"
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(
    *sources: str | Path | dict, overrides: list[str] | tuple[str, ...] = (), validate_stage1_roi: bool = True
) -> DictConfig:
    """Merge YAML files (or dicts) and ``key=value`` overrides onto the schema, then validate."""
    layers, names = [], []
    for source in sources:
        if isinstance(source, dict | DictConfig):
            layers.append(OmegaConf.create(source))
            names.append("<dict>")
            continue
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        layers.append(loaded)
        names.append(str(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        names.append("overrides")
    source = " + ".join(names) or "<defaults>"
    merged = _merge(layers, source)
    try:
        stage = stage_of(merged)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    cfg = _merge([_STAGE_DEFAULTS[stage], *layers], source)
    validate(cfg, source, validate_stage1_roi)
    return cfg


def _axis_codes(codes: str) -> bool:
    """Three orientation codes naming each of the three axes once (RAS, LPS, PIR, ...)."""
    pairs = [pair for code in codes for pair in ("RL", "AP", "SI") if code in pair]
    return len(codes) == 3 and len(pairs) == 3 and len(set(pairs)) == 3


def _fail(source: str, key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{source}: {key} {problem}; {fix}")


def validate(cfg: DictConfig, source: str = "config", check_roi: bool = True) -> None:
    """Reject impossible combinations with a message that names the key and the fix."""
    # Imported here: the VQ-GAN module pulls in MONAI, which the CLI should not load at start-up.
    from voldit.models.vqgan import downsample_factor

    roi = list(cfg.training.roi_size)
    if len(roi) != 3 or min(roi) < 1:
        _fail(
            source, "training.roi_size", f"is {roi}", "give three positive voxel counts, e.g. [512, 512, 256]"
        )
    spacing = cfg.training.spacing
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        _fail(
            source,
            "training.spacing",
            f"is {list(spacing)}",
            "give three positive voxel sizes in mm, e.g. [1.5, 1.5, 2.0], or null to keep each file's own",
        )
    codes = cfg.training.orientation
    if codes is not None and not _axis_codes(codes):
        _fail(
            source,
            "training.orientation",
            f"is {codes!r}",
            "give three axis codes, one of R/L, A/P and S/I each (e.g. RAS or LPS), or null to keep the stored order",
        )
    every = cfg.training.checkpoint_every_steps
    if every is not None and every < 1:
        _fail(
            source,
            "training.checkpoint_every_steps",
            f"is {every}",
            "give a step count of 1 or more, or null",
        )
    factor = None
    if cfg.stage1 is not None:
        p = cfg.stage1.params
        if len(p.num_channels) != len(p.num_res_channels) or len(p.num_channels) != len(
            p.downsample_parameters
        ):
            _fail(
                source,
                "stage1.params.num_channels",
                "num_res_channels and downsample_parameters have different lengths",
                "give one entry per level in each",
            )
        if len(p.upsample_parameters) != len(p.downsample_parameters):
            _fail(
                source,
                "stage1.params.upsample_parameters",
                "has a different length from downsample_parameters",
                "give one entry per level",
            )
        factor = downsample_factor(p.downsample_parameters)
        if check_roi and any(s % factor for s in roi):
            _fail(
                source,
                "training.roi_size",
                f"{roi} is not divisible by the VQ-GAN downsampling factor {factor}",
                f"use sizes that are multiples of {factor}, e.g. {[s - s % factor or factor for s in roi]}",
            )
    if cfg.dit is not None:
        _validate_dit(cfg, source, factor)
    if cfg.tgca is not None:
        _validate_tgca(cfg, source)
    if cfg.training.mixed_precision not in PRECISION_MODES:
        _fail(
            source, "training.mixed_precision", f"is {cfg.training.mixed_precision!r}", "use bf16, fp16 or no"
        )
    if not 0.0 <= cfg.training.ema_decay < 1.0:
        _fail(source, "training.ema_decay", f"is {cfg.training.ema_decay}", "use a value in [0, 1)")
    if cfg.training.peak_flops is not None and not cfg.training.peak_flops > 0:
        _fail(
            source,
            "training.peak_flops",
            f"is {cfg.training.peak_flops}",
            "use the device's FLOP/s, e.g. 989e12",
        )
    if cfg.training.batch_size < 1:
        _fail(source, "training.batch_size", f"is {cfg.training.batch_size}", "use at least 1")
    if cfg.training.num_workers not in (None, SEED_NUM_WORKERS):
        _fail(
            source,
            "training.num_workers",
            f"is {cfg.training.num_workers}, but voldit does not read it (Ray Data loads with the cluster's "
            "CPUs)",
            "remove the key; the number of training workers is `voldit train --workers N`",
        )


def _validate_dit(cfg: DictConfig, source: str, factor: int | None) -> None:
    """``factor``: the VQ-GAN's downsampling factor, when the config has a stage1 section."""
    p, s = cfg.dit.params, cfg.dit.scheduler
    if p.hidden_size % p.num_heads:
        _fail(
            source,
            "dit.params.hidden_size",
            f"{p.hidden_size} is not divisible by dit.params.num_heads {p.num_heads}",
            "choose num_heads that divides hidden_size (head width = hidden_size / num_heads)",
        )
    if len(p.input_size) != 3 or any(n % p.patch_size for n in p.input_size):
        _fail(
            source,
            "dit.params.input_size",
            f"{list(p.input_size)} is not divisible by dit.params.patch_size {p.patch_size}",
            "use a latent size whose every axis is a multiple of the patch size",
        )
    if p.num_classes != 0 or p.learn_sigma or p.class_dropout_prob != 0:
        _fail(
            source,
            "dit.params.num_classes",
            "asks for class labels or learned sigma, which VolDiT has not",
            "set num_classes: 0, learn_sigma: false, class_dropout_prob: 0.0 (use TGCA for conditioning)",
        )
    for key in ("dropout", "attention_dropout"):
        if not 0.0 <= p[key] < 1.0:
            _fail(source, f"dit.params.{key}", f"is {p[key]}", "use a probability in [0, 1)")
    if p.attention not in BACKENDS:
        _fail(source, "dit.params.attention", f"is {p.attention!r}", f"use one of {list(BACKENDS)}")
    if s.schedule not in SCHEDULES:
        _fail(source, "dit.scheduler.schedule", f"is {s.schedule!r}", f"use one of {list(SCHEDULES)}")
    if s.prediction_type not in PREDICTION_TYPES:
        _fail(
            source,
            "dit.scheduler.prediction_type",
            f"is {s.prediction_type!r}",
            f"use one of {list(PREDICTION_TYPES)}",
        )
    if cfg.stage1 is not None:
        p1 = cfg.stage1.params
        latent = [n // factor for n in cfg.training.roi_size]
        if latent != list(p.input_size):
            _fail(
                source,
                "dit.params.input_size",
                f"{list(p.input_size)} differs from the latent of "
                f"training.roi_size {list(cfg.training.roi_size)} / {factor} = {latent}",
                "make input_size equal roi_size divided by the VQ-GAN downsampling factor",
            )
        if p1.embedding_dim != p.in_channels:
            _fail(
                source,
                "dit.params.in_channels",
                f"{p.in_channels} differs from stage1.params.embedding_dim {p1.embedding_dim}",
                "make them equal",
            )


def _validate_tgca(cfg: DictConfig, source: str) -> None:
    t = cfg.tgca.params
    if not cfg.tgca.condition_keys:
        _fail(source, "tgca.condition_keys", "is empty", "name at least one mask column, e.g. [mask]")
    if t.condition_channels < len(cfg.tgca.condition_keys):
        _fail(
            source,
            "tgca.params.condition_channels",
            f"{t.condition_channels} is fewer than the {len(cfg.tgca.condition_keys)} condition keys",
            "give at least one channel per key",
        )
    for key in ("condition_dropout_prob", "channel_dropout_prob"):
        if not 0.0 <= t[key] < 1.0:
            _fail(source, f"tgca.params.{key}", f"is {t[key]}", "use a value in [0, 1)")
    dup = cfg.training.condition_dropout
    if dup is not None and dup != t.condition_dropout_prob:
        _fail(
            source,
            "training.condition_dropout",
            f"({dup}) contradicts tgca.params.condition_dropout_prob "
            f"({t.condition_dropout_prob}); the whole condition is dropped once per sample",
            "set only tgca.params.condition_dropout_prob",
        )
    if cfg.training.spatial_dropout_prob:
        _fail(source, "training.spatial_dropout_prob", "is not supported", "set it to 0.0")
    try:
        qc_parse(gate_settings(cfg.tgca.qc))
    except ValueError as error:
        _fail(source, "tgca.qc", f"is not a usable quality gate ({error})", "see voldit/qc.py for the ranges")
    if cfg.dit is not None:
        depth = cfg.dit.params.depth
        if t.inject_layers is not None and not 1 <= t.inject_layers <= depth:
            _fail(
                source,
                "tgca.params.inject_layers",
                f"is {t.inject_layers} for a DiT of depth {depth}",
                f"use null (every block) or 1..{depth}",
            )
        if not 0 <= t.finetune_last_n_blocks <= depth:
            _fail(
                source,
                "tgca.params.finetune_last_n_blocks",
                f"is {t.finetune_last_n_blocks} for a DiT of depth {depth}",
                f"use 0..{depth}",
            )


def gate_settings(gate: DictConfig) -> dict[str, Any]:
    """tgca.qc as the gate's settings ({min_voxels, min_inside, retries}; voldit.qc.parse reads them)."""
    return {"min_voxels": gate.min_voxels, "min_inside": gate.min_inside, "retries": gate.retries}


def section_dict(section: DictConfig) -> dict[str, Any]:
    """A plain dict of one section, for passing to constructors."""
    return OmegaConf.to_container(section, resolve=True)


def dit_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """DiT3D constructor arguments from a config's dit.params (seed-only keys dropped)."""
    p = section_dict(cfg.dit.params)
    for key in ("class_dropout_prob", "num_classes", "learn_sigma", "flash_attention"):
        p.pop(key)
    return p


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
