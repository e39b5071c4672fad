"""Reproductions of the paper's experiments. ``gaaf-patch repro mnist`` runs :func:`.mnist.run_study`."""

from .mnist import StudyConfig, run_study, summarize
from .models import MODELS, PAPER, PAPER_GRADIENT_INFO
from .train import TrainConfig

__all__ = ["StudyConfig", "run_study", "summarize", "TrainConfig", "MODELS", "PAPER", "PAPER_GRADIENT_INFO"]
