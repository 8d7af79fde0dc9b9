"""Devices, mixed precision, seeding and distribution: the only package that touches them.

Importing it does not import torch; the functions do.
"""

from autoseg.runtime.distributed import RuntimeContext

__all__ = ["RuntimeContext"]
