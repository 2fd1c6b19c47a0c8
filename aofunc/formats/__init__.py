"""The weight formats: schemes, the QTensor that carries them, and its dispatch table."""
from aofunc.formats.int4 import Int4WeightOnly
from aofunc.formats.int8 import Int8Dynamic, Int8WeightOnly
from aofunc.formats.int8_int4 import Int8DynamicInt4
from aofunc.formats.nf4 import NF4
from aofunc.formats.qtensor import QTensor, implements
from aofunc.formats.scheme import SCHEMES, Scheme, scheme_from_dict

__all__ = ["Int4WeightOnly", "Int8Dynamic", "Int8WeightOnly", "Int8DynamicInt4", "NF4", "QTensor", "Scheme",
           "SCHEMES", "implements", "scheme_from_dict"]
