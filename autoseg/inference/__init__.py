"""Inference: sliding-window prediction, export to the input's geometry, folder prediction, ensembling,
postprocessing.

Never imports training: a model folder (autoseg.model_folder) is the whole contract between them.
Importing this package loads torch.
"""

from autoseg.inference.ensemble import EnsembleError, ensemble_folders
from autoseg.inference.info import PredictionInfo, read_prediction_info
from autoseg.inference.postprocess import (
    ComponentRule,
    PostprocessingError,
    PostprocessingRules,
    apply_rules,
    keep_largest_component,
    load_rules,
    postprocess_folder,
    save_rules,
)
from autoseg.inference.predictor import Prediction, PredictOptions, Predictor
from autoseg.inference.run import PredictReport, find_input_cases, predict_folder
from autoseg.inference.sliding import WindowSettings, sliding_window_logits

__all__ = [
    "ComponentRule",
    "EnsembleError",
    "PostprocessingError",
    "PostprocessingRules",
    "PredictOptions",
    "Prediction",
    "PredictionInfo",
    "PredictReport",
    "Predictor",
    "WindowSettings",
    "apply_rules",
    "ensemble_folders",
    "find_input_cases",
    "keep_largest_component",
    "load_rules",
    "predict_folder",
    "postprocess_folder",
    "read_prediction_info",
    "save_rules",
    "sliding_window_logits",
]
