"""Prediction: the Predictor API, batch runs over files, report writers."""

from imgtriage.predict.predictor import PredictOptions, Predictor
from imgtriage.predict.report import write_report

__all__ = ["PredictOptions", "Predictor", "write_report"]
