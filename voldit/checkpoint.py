"""Self-describing checkpoints: one directory per checkpoint, the same layout for every stage.

    config.yaml                the resolved config the model was built from
    meta.json                  stage, step, epoch, scale factor, latent shape, metrics, versions
    model.safetensors          weights (the whole model, so the directory alone rebuilds it)
    ema.safetensors            EMA of the trainable weights (optional)
    <name>.safetensors         further networks, e.g. the VQ-GAN's discriminator
    training_state.{json,safetensors}  optimisers, scaler, LR schedule, RNG state: tensors in safetensors,
                               the rest in JSON (never pickle)

Writes go to a sibling temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from voldit.errors import VolditError

FORMAT_VERSION = 1
_TENSOR = "__tensor__"


class CheckpointError(VolditError, RuntimeError):
    """A checkpoint directory that is missing, incomplete or does not fit what is asked of it."""


def versions() -> dict[str, str]:
    import monai

    import voldit

    return {"voldit": voldit.__version__, "torch": torch.__version__, "monai": monai.__version__}


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Split a nested state (dicts, lists, tuples, tensors, numbers) into a JSON skeleton and named tensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [flatten_state(k, tensors, f"{prefix}.k{i}"), flatten_state(v, tensors, f"{prefix}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, list | tuple):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy array (e.g. numpy RNG state)
        return flatten_state(torch.from_numpy(obj.copy()), tensors, prefix) | {"numpy": True}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's training state")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            tensor = tensors[skeleton[_TENSOR]]
            return tensor.numpy() if skeleton.get("numpy") else tensor
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied or sliced tensors are written as themselves.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    path: str | Path,
    *,
    config: DictConfig,
    stage: str,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    networks: dict[str, dict[str, torch.Tensor]] | None = None,
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing any previous one at ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        OmegaConf.save(config, tmp / "config.yaml", resolve=True)
        save_file(_contiguous(model), tmp / "model.safetensors")
        if ema is not None:
            save_file(_contiguous(ema), tmp / "ema.safetensors")
        for name, state in (networks or {}).items():
            save_file(_contiguous(state), tmp / f"{name}.safetensors")
        if training_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            skeleton = flatten_state(training_state, tensors)
            save_file(tensors, tmp / "training_state.safetensors")
            (tmp / "training_state.json").write_text(json.dumps(skeleton))
        full_meta = {"format": FORMAT_VERSION, "stage": stage, "versions": versions(), **(meta or {})}
        # meta.json is written last: its presence marks a complete checkpoint.
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(staged: Path, path: Path) -> None:
    """Put a fully written directory at ``path``, replacing what was there; the old one is only removed
    once the new one is in place."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(staged, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, path)


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint directory to ``target`` atomically (staged beside it, then swapped in)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, staged, dirs_exist_ok=True)
        _swap_into_place(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: its config and metadata, with weights read on demand."""

    path: Path
    config: DictConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.meta["stage"]

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def weights(self, name: str = "model") -> dict[str, torch.Tensor]:
        file = self.path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {name} weights ({file.name})")
        return load_file(file)

    def model_state(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The model's weights, with the EMA weights in place of the trained ones when asked and present."""
        state = self.weights("model")
        if use_ema and self.has("ema"):
            ema = self.weights("ema")
            unknown = set(ema) - set(state)
            if unknown:
                raise CheckpointError(
                    f"checkpoint {self.path}: EMA weights for unknown keys {sorted(unknown)[:3]}"
                )
            state.update(ema)
        return state

    def training_state(self) -> dict[str, Any] | None:
        if not (self.path / "training_state.json").is_file():
            return None
        skeleton = json.loads((self.path / "training_state.json").read_text())
        return unflatten_state(skeleton, load_file(self.path / "training_state.safetensors"))


def load_checkpoint(path: str | Path, stage: str | None = None) -> Checkpoint:
    """Open a checkpoint directory (local, or an ``s3://`` URL, cached locally); with ``stage``, insist
    that it is a checkpoint of that stage."""
    from voldit import storage

    source = path
    path = storage.localize_dir(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {source} does not exist (a checkpoint is a directory with meta.json)"
        )
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete voldit checkpoint: meta.json is missing")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
    if stage is not None and meta.get("stage") != stage:
        raise CheckpointError(
            f"checkpoint {path} is a {meta.get('stage')!r} checkpoint, expected a {stage!r} one"
        )
    from omegaconf import OmegaConf

    from voldit.config import load_config

    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not a complete voldit checkpoint: config.yaml is missing")
    stored = OmegaConf.load(path / "config.yaml")
    if "orientation" not in stored.get("training", {}):  # saved before grids: the stored voxel order
        OmegaConf.update(stored, "training.orientation", None, force_add=True)
    return Checkpoint(path=path, config=load_config(stored), meta=meta)
