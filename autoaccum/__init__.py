"""autoaccum: exact large-batch training on the GPU you have.

``fit`` finds the largest micro-batch that fits, derives the accumulation steps, and runs each
optimizer step so that the update equals the update of one full batch.
"""
from . import count, kernels
from .estimate import Estimate, estimate
from .fit import fit
from .distributed import PeerFailure
from .memory import NotEnoughMemoryError
from .plan import Plan, plan
from .probe import ProbeResult, probe
from .search import MemoryModel, Trial
from .trainer import StepStats, Trainer

__all__ = ["fit", "plan", "probe", "estimate", "count", "kernels", "Estimate", "Plan", "Trainer", "StepStats", "ProbeResult", "Trial", "MemoryModel",
           "NotEnoughMemoryError", "PeerFailure"]
__version__ = "0.1.0"
