"""Diffusion: schedules, the training objective and samplers over a ``denoise(x, t, **cond)`` callable."""

from voldit.diffusion.objective import diffusion_loss
from voldit.diffusion.samplers import SAMPLERS, classifier_free, sample
from voldit.diffusion.schedule import NoiseSchedule

__all__ = ["SAMPLERS", "NoiseSchedule", "classifier_free", "diffusion_loss", "sample"]
