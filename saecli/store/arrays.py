"""Turning records (nested dicts/lists with numpy arrays) into storable pieces and back.

Both backends keep the JSON-like part of a record as a document and the numpy arrays compactly
beside it; a marker dict ``{"__ndarray__": ...}`` stands where an array was. `plain` walks a record
once, normalising numpy scalars and tuples and handing each array to a backend-specific callback;
`restore` walks the stored document and turns markers back into arrays.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

MARK = "__ndarray__"


def plain(obj: Any, on_array: Callable[[np.ndarray], Any], where: str = "") -> Any:
    """A copy of `obj` made of dict/list/str/int/float/bool/None, arrays replaced by `on_array(a)`."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where or 'value'}: object arrays cannot be stored (dtype {obj.dtype})")
        return on_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): plain(v, on_array, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, on_array, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where or 'value'}: cannot store a {type(obj).__name__} (use numpy arrays and JSON types)")


def no_arrays(a: np.ndarray) -> Any:
    """`on_array` for configs and metrics, which must stay plain JSON."""
    raise TypeError(f"numpy arrays are not allowed here (got shape {a.shape}); convert to a list first")


def restore(obj: Any, load: Callable[[dict], np.ndarray]) -> Any:
    """Inverse of `plain`: every marker dict becomes `load(marker)`."""
    if isinstance(obj, dict):
        if MARK in obj:
            return load(obj)
        return {k: restore(v, load) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore(v, load) for v in obj]
    return obj


@functools.lru_cache(maxsize=4096)
def _npy_prefix(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buf, fields)
    except ValueError:  # a header over 64 KiB (a huge structured dtype): format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, fields)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    """The .npy encoding of `a` (header with dtype and shape, then the data in C order), as np.save writes."""
    return _npy_prefix(a.dtype, a.shape) + a.tobytes(order="C")


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of a .npy header; records repeat a few shapes, so cache them."""
    fields = ast.literal_eval(header.decode("utf-8"))
    return np.lib.format.descr_to_dtype(fields["descr"]), tuple(fields["shape"]), fields["fortran_order"]


def from_npy(data: bytes | memoryview) -> np.ndarray:
    """Read .npy bytes (what `npy_bytes` wrote). np.load parses each header anew, 10x slower here."""
    view = memoryview(data)
    if bytes(view[:6]) != b"\x93NUMPY":
        raise ValueError("not .npy data")
    wide = view[6] >= 2  # format 2.0 and 3.0 have a 4-byte header length
    (size,) = struct.unpack_from("<I" if wide else "<H", view, 8)
    start = 12 if wide else 10
    dtype, shape, fortran = _npy_header(bytes(view[start : start + size]))
    flat = np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=start + size)
    out = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    return out.copy()  # writable, and independent of the row it came from


_LEN = struct.Struct("<Q")


def pack(record: Any) -> tuple[Any, bytes | None]:
    """(JSON-able document, one BLOB holding every array as length-prefixed .npy frames or None)."""
    frames: list[bytes] = []

    def keep(a: np.ndarray) -> dict:
        frames.append(npy_bytes(a))
        return {MARK: len(frames) - 1}

    doc = plain(record, keep)
    if not frames:
        return doc, None
    return doc, b"".join(_LEN.pack(len(f)) + f for f in frames)


def unpack(doc: Any, blob: bytes | None) -> Any:
    """Inverse of `pack`."""
    if blob is None:
        return doc
    view, frames, at = memoryview(blob), [], 0
    while at < len(view):
        (n,) = _LEN.unpack_from(view, at)
        frames.append(view[at + _LEN.size : at + _LEN.size + n])
        at += _LEN.size + n
    return restore(doc, lambda m: from_npy(frames[m[MARK]]))
