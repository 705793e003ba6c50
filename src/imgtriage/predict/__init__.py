"""Prediction: the Predictor API, batch runs over files, report writers."""

from imgtriage.predict.predictor import Decoded, PredictOptions, Predictor
from imgtriage.predict.report import write_report

__all__ = ["Decoded", "PredictOptions", "Predictor", "write_report"]
