"""The docstring examples of the calibrated transforms run and print what they say."""
import doctest
import importlib

import pytest
import torch

import aofunc

MODULES = ["fold", "gptq", "gptq_core", "smoothquant", "sparse", "wanda"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"aofunc.calibrate.{name}")
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs={"aofunc": aofunc, "torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
