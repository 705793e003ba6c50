"""Prediction: one predictor contract and its kinds, batch runs over files, report writers.

:class:`~imgtriage.predict.base.BasePredictor` is the contract (decode -> rows -> report);
:class:`Predictor` is the classifier kind and ``Predictor.load`` opens a bundle of any kind
(classifier, gallery, cascade; see :mod:`imgtriage.predict.kinds`).
"""

from imgtriage.predict.base import BasePredictor, Decoded, Decoder, PredictOptions
from imgtriage.predict.predictor import Predictor
from imgtriage.predict.report import write_report

__all__ = ["BasePredictor", "Decoded", "Decoder", "PredictOptions", "Predictor",
           "write_report"]
