"""aofunc: quantization and sparsity for PyTorch as pure functions over parameter trees.

    params  = dict(model.named_parameters())
    qparams = aofunc.quantize(params, aofunc.Spec([aofunc.Rule(r".*\\.weight", aofunc.Int4WeightOnly(128))]))
    y       = torch.func.functional_call(model, qparams, (x,))
"""
from aofunc import ops as _ops  # noqa: F401  (registers the torch functions a QTensor answers)
from aofunc.apply import apply, bind, join_quantized, split_quantized
from aofunc.calibrate import *  # noqa: F401,F403  (its __all__ lists the calibrated transforms)
from aofunc.calibrate import __all__ as _calibrate_all
from aofunc.capture import capture_inputs, record_shapes
from aofunc.formats import NF4, Int4WeightOnly, Int8Dynamic, Int8DynamicInt4, Int8WeightOnly, QTensor, Scheme
from aofunc.io import load, save
from aofunc.ops import qlinear
from aofunc.pretrained import load_pretrained, save_pretrained
from aofunc.primitives import sqnr
from aofunc.quantize import dequantize, quantize
from aofunc.spec import Rule, Spec, SpecReport, SpecWarning
from aofunc.tree import size_in_bytes
from aofunc.tuning import tune

__version__ = "0.1.0"

__all__ = [
    "NF4", "Int4WeightOnly", "Int8Dynamic", "Int8DynamicInt4", "Int8WeightOnly", "QTensor", "Rule", "Scheme",
    "Spec", "SpecReport", "SpecWarning", "apply", "bind", "capture_inputs", "dequantize", "join_quantized", "load",
    "load_pretrained", "qlinear", "quantize", "record_shapes", "save", "save_pretrained", "size_in_bytes",
    "split_quantized", "sqnr", "tune",
] + list(_calibrate_all)
