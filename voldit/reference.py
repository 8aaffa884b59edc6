"""Import checkpoints published by the paper's authors (``.pth`` files) into voldit checkpoint directories.

Their layouts: a VQ-GAN file holds ``model`` (or ``state_dict``, or is the bare state dict), plus
optimiser states we do not need; a VolDiT or TGCA file holds ``model`` and ``ema`` = {decay, shadow},
the shadow covering the trainable parameters. Parameter names are the same as ours, except the DiT's
empty class-label table ``y_embedder.embedding_table.weight`` (num_classes = 0), which is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from voldit.builders import build_dit, build_tgca, build_vqgan, latent_shape
from voldit.checkpoint import CheckpointError, save_checkpoint
from voldit.config import stage_of

log = logging.getLogger(__name__)

_EMPTY_LABEL_TABLE = "y_embedder.embedding_table.weight"


def _read_reference(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain containers only, nothing executable is unpickled.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None


def _model_state(blob: dict, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(blob.get(key), dict):
            return dict(blob[key])
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return dict(blob)
    raise CheckpointError(
        f"{path}: found none of the keys 'model' or 'state_dict' and it is no bare state dict"
    )


def _strip_prefixes(state: dict[str, torch.Tensor], prefix_of: str) -> dict[str, torch.Tensor]:
    # Files saved from a DDP-wrapped or compiled model carry "module." / "_orig_mod." prefixes.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    table = prefix_of + _EMPTY_LABEL_TABLE
    if table in state:
        if state[table].numel():
            raise CheckpointError(
                "the reference model is class-conditional (num_classes > 0); VolDiT here is not"
            )
        del state[table]
    return state


def import_reference(
    reference: str | Path,
    config: DictConfig,
    output: str | Path,
    scale_factor: float | None = None,
) -> Path:
    """Convert one reference checkpoint, built per ``config`` (its stage decides the model), into ``output``."""
    reference = Path(reference)
    stage = stage_of(config)
    blob = _read_reference(reference)
    prefix = "base_model." if stage == "tgca" else ""
    state = _strip_prefixes(_model_state(blob, reference), prefix)
    model = {"vqgan": build_vqgan, "dit": build_dit, "tgca": build_tgca}[stage](config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{reference} does not fit the {stage} architecture of the given config: {error}. "
            "Pass the config the checkpoint was trained with."
        ) from None

    ema = None
    shadow = (blob.get("ema") or {}).get("shadow") if isinstance(blob.get("ema"), dict) else None
    if shadow:
        shadow = _strip_prefixes(dict(shadow), prefix)
        params = dict(model.named_parameters())
        unknown = [k for k in shadow if k not in params]
        if unknown:
            raise CheckpointError(f"{reference}: EMA shadow holds unknown parameters {unknown[:3]}")
        ema = {k: v.to(params[k].dtype) for k, v in shadow.items()}

    meta = {"step": 0, "epoch": int(blob.get("epoch", 0) or 0), "imported_from": str(reference)}
    if stage == "vqgan":
        meta["latent_shape"] = latent_shape(config)
    else:
        meta["latent_shape"] = [config.dit.params.in_channels, *config.dit.params.input_size]
        # The authors' scale factor lived in their sampling flags; it must be given to be recorded.
        meta["scale_factor"] = scale_factor
    # The authors' discriminator and optimiser states are not imported: sampling and encoding need neither.
    path = save_checkpoint(output, config=config, stage=stage, model=model.state_dict(), ema=ema, meta=meta)
    log.info("imported %s (%s, EMA: %s) to %s", reference, stage, ema is not None, path)
    return path
