"""Calibrated transforms: folds over calibration batches (GPTQ, SmoothQuant, Wanda) and pruning.

Each takes params and returns new params; the fold they are built on is public (`Calibration`, `fold`).
"""
from aofunc.calibrate.fold import Calibration, fold
from aofunc.capture import ExpertRows
from aofunc.calibrate.gptq import HessianState, gptq, gptq_calibration
from aofunc.calibrate.gptq_core import gptq_quantize_weight
from aofunc.calibrate.smoothquant import SmoothQuantState, smoothquant, smoothquant_calibration
from aofunc.calibrate.sparse import Sparse, prune, semi_structured
from aofunc.calibrate.wanda import WandaState, wanda, wanda_calibration

__all__ = ["Calibration", "ExpertRows", "HessianState", "SmoothQuantState", "Sparse", "WandaState", "fold", "gptq",
           "gptq_calibration", "gptq_quantize_weight", "prune", "semi_structured", "smoothquant", "smoothquant_calibration",
           "wanda", "wanda_calibration"]
