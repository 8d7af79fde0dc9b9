"""autoseg: self-configuring U-Net segmentation for medical volumes.

Importing autoseg is cheap: torch, SimpleITK and friends load only when a stage needs them.
The Python API lives in `autoseg.api`; the command line in `autoseg.cli`.
"""

__version__ = "0.1.0"
