"""Planning stage: fingerprint + dataset -> Plans (spacing, topology, patch, batch per setup).

Pure Python and numpy; importing it does not import torch.
"""

from autoseg.planning.contract import Configuration, Plans, Resampling
from autoseg.planning.memory import estimate_memory_gb, fits
from autoseg.planning.planner import plan
from autoseg.planning.summary import summarize

__all__ = ["Configuration", "Plans", "Resampling", "estimate_memory_gb", "fits", "plan", "summarize"]
