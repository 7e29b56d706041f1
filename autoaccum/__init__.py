"""autoaccum: exact large-batch training on the GPU you have.

``fit`` finds the largest micro-batch that fits, derives the accumulation steps, and runs each
optimizer step so that the update equals the update of one full batch.
"""
from .fit import fit
from .plan import Plan, plan
from .trainer import StepStats, Trainer

__all__ = ["fit", "plan", "Plan", "Trainer", "StepStats"]
__version__ = "0.1.0"
