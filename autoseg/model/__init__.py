"""Network shape (Topology), the U-Net's closed-form size, and the network families
(`autoseg.model.families`); the torch builders and the generic estimator import torch lazily."""

from autoseg.model.contract import Topology
from autoseg.model.size import feature_map_elements, parameter_count, receptive_field, stage_shapes

__all__ = ["Topology", "feature_map_elements", "parameter_count", "receptive_field", "stage_shapes"]
