"""Network shape (Topology) and its closed-form size; the torch builders import torch lazily."""

from autoseg.model.contract import Topology
from autoseg.model.size import feature_map_elements, parameter_count, receptive_field, stage_shapes

__all__ = ["Topology", "feature_map_elements", "parameter_count", "receptive_field", "stage_shapes"]
