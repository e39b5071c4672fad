"""Studies. ``gaaf-patch repro mnist`` (the paper's experiments) runs :func:`.mnist.run_study`; ``gaaf-patch repro
depth`` (deep ResNets at their usual learning rates, paper gain against the auto gain) runs :mod:`.depth`."""

from .mnist import StudyConfig, run_study, summarize
from .models import MODELS, PAPER, PAPER_GRADIENT_INFO
from .train import TrainConfig

__all__ = ["StudyConfig", "run_study", "summarize", "TrainConfig", "MODELS", "PAPER", "PAPER_GRADIENT_INFO"]
