"""model/native.c's shared library, loaded with ctypes: the serving step (model/fast_step.py native_step) and one
user's top-k (service/scoring.py) in C.

`pip install` builds it as model/_native*.so (pyproject.toml: an optional extension). Where it was not built (no C
compiler), `library()` is None and both callers keep their Python paths: the ONNX Runtime step, torch's product and
top-k. Plain C behind ctypes rather than a Python extension module: nothing in it touches a Python object, and ctypes
lets go of the GIL for each call.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util


@functools.cache
def library() -> ctypes.CDLL | None:
    try:
        spec = importlib.util.find_spec("model._native")
        if spec is None or spec.origin is None:
            return None
        lib = ctypes.CDLL(spec.origin)
    except (OSError, ImportError):
        return None
    p, i32 = ctypes.c_void_p, ctypes.c_int32
    lib.holorec_step.argtypes = [p, p, p, ctypes.c_float, p, i32, ctypes.c_char_p, p, p]
    lib.holorec_top.argtypes = [p, i32, i32, p, p, i32, p, p, p, p, i32, i32, p, p, p]
    lib.holorec_step.restype = lib.holorec_top.restype = ctypes.c_int
    return lib
