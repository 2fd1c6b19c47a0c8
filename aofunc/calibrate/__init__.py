"""Calibrated transforms: folds over calibration batches (GPTQ, SmoothQuant, Wanda) and pruning."""

__all__: list[str] = []
