"""Reading a (possibly huge) ONNX initializer in blocks along its first axis.

The N:M check of a written model must not hold a weight several times over: a 150 MB embedding read whole
plus its comparison temporaries once set the peak memory of a whole compile. A float tensor in external
data is therefore read straight from its file, one block of rows at a time; anything else (in-protobuf
data, other element types) is loaded by ONNX and sliced.

Example:
    >>> # rows = block_rows(tuple(t.dims), axis=1, m=4, itemsize=element_size(t))
    >>> # for block in read_blocks(t, "out/", rows): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["BLOCK_BYTES", "block_rows", "element_size", "read_blocks"]

BLOCK_BYTES = 16 << 20  # about this many bytes per block
# External-data element types read straight from the file (little-endian, as ONNX stores them).
_FILE_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
}


def element_size(tensor: onnx.TensorProto) -> int:
    """Bytes per element as stored (4 for the types not read from files: they are checked as float32)."""
    return _FILE_DTYPES.get(tensor.data_type, np.dtype("<f4")).itemsize


def block_rows(shape: tuple[int, ...], axis: int, m: int, itemsize: int) -> int:
    """Rows of axis 0 per block: about :data:`BLOCK_BYTES`, whole groups of ``m`` when ``axis`` is 0."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, BLOCK_BYTES // row_bytes)
    return -(-rows // m) * m if axis == 0 else rows


def _external_file(tensor: onnx.TensorProto, base_dir: str) -> tuple[Path, int] | None:
    """(file, byte offset) of a float tensor stored in a file inside ``base_dir``, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type not in _FILE_DTYPES:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    base = Path(base_dir).resolve()
    file = (base / info.get("location", "")).resolve()
    if base not in file.parents or not file.is_file():
        return None  # let ONNX's own loader report a bad location
    return file, int(info.get("offset", 0) or 0)


def read_blocks(tensor: onnx.TensorProto, base_dir: str, rows: int) -> Iterator[np.ndarray]:
    """``tensor``'s value in consecutive blocks of ``rows`` along axis 0 (one block for a scalar).

    Raises:
        ValueError: the external data file ends before the tensor does.
    """
    shape = tuple(int(d) for d in tensor.dims)
    source = _external_file(tensor, base_dir)
    if source is None or not shape:
        arr = numpy_helper.to_array(tensor, base_dir=base_dir)
        yield from (arr[i : i + rows] for i in range(0, len(arr), rows)) if arr.ndim else (arr,)
        return
    file, offset = source
    dtype = _FILE_DTYPES[tensor.data_type]
    row_items = int(np.prod(shape[1:], dtype=np.int64))
    with open(file, "rb") as f:
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            f.seek(offset + start * row_items * dtype.itemsize)
            block = np.fromfile(f, dtype=dtype, count=count * row_items)
            if block.size != count * row_items:
                raise ValueError(f"{file}: external data of {tensor.name!r} is truncated")
            yield block.reshape(count, *shape[1:])
