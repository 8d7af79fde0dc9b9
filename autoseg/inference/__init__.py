"""Inference: sliding-window prediction, export to the input's geometry, folder prediction, ensembling,
postprocessing.

Never imports training: a model folder (autoseg.model_folder) is the whole contract between them.
Importing this package loads torch.
"""

from autoseg.inference.info import PredictionInfo, read_prediction_info
from autoseg.inference.predictor import Prediction, PredictOptions, Predictor
from autoseg.inference.run import PredictReport, find_input_cases, predict_folder
from autoseg.inference.sliding import WindowSettings, sliding_window_logits

__all__ = [
    "PredictOptions",
    "Prediction",
    "PredictionInfo",
    "PredictReport",
    "Predictor",
    "WindowSettings",
    "find_input_cases",
    "predict_folder",
    "read_prediction_info",
    "sliding_window_logits",
]
