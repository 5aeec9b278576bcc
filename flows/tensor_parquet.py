"""Tensor columns in Parquet as one fixed-size binary value per row, with their shape in the field metadata.

Ray writes a tensor column (`ArrowTensorType`, a list of scalars) as a Parquet list, which encodes a
repetition and a definition level for every pixel: for 16 frames of 112×112 RGB that is 602,112 levels per
clip, and it took more time than the clip's decode at 360p (BENCHMARKS.md, "Decode"). A fixed-size binary
value is one value per clip, the same bytes. `write_parquet` stores tensor columns that way and
`read_parquet` turns them back into tensor columns (zero-copy), so a clip file reads back as it was written.
Other readers (DuckDB, pandas) see a BLOB column and the metadata `reelflow.shape`/`reelflow.dtype`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

SHAPE_KEY = b"reelflow.shape"
DTYPE_KEY = b"reelflow.dtype"


def tensors_to_binary(table: pa.Table) -> pa.Table:
    """`table` with every fixed-shape tensor column stored as fixed-size binary (shape in its metadata)."""
    from ray.data.extensions import ArrowTensorType, ArrowTensorTypeV2

    for index, field in enumerate(table.schema):
        if not isinstance(field.type, ArrowTensorType | ArrowTensorTypeV2):
            continue
        shape, dtype = tuple(field.type.shape), np.dtype(field.type.storage_type.value_type.to_pandas_dtype())
        values = _tensor_numpy(table.column(index), shape, dtype)
        width = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        binary = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), len(values), [None, pa.py_buffer(np.ascontiguousarray(values))]
        )
        metadata = {**(field.metadata or {}), SHAPE_KEY: json.dumps(shape).encode()}
        metadata[DTYPE_KEY] = dtype.str.encode()
        table = table.set_column(index, pa.field(field.name, binary.type, metadata=metadata), binary)
    return table


def binary_to_tensors(table: pa.Table) -> pa.Table:
    """`table` with every column that `tensors_to_binary` stored turned back into a tensor column."""
    from ray.data.extensions import ArrowTensorArray

    for index, field in enumerate(table.schema):
        if not field.metadata or SHAPE_KEY not in field.metadata:
            continue
        shape = tuple(json.loads(field.metadata[SHAPE_KEY]))
        dtype = np.dtype(field.metadata[DTYPE_KEY].decode())
        column = table.column(index).combine_chunks()
        buffer = column.buffers()[1]
        width = column.type.byte_width
        flat = np.frombuffer(buffer, dtype=np.uint8, count=width * len(column), offset=column.offset * width)
        values = flat.view(dtype).reshape(len(column), *shape)
        metadata = {k: v for k, v in field.metadata.items() if k not in (SHAPE_KEY, DTYPE_KEY)} or None
        tensors = ArrowTensorArray.from_numpy(values)
        table = table.set_column(index, pa.field(field.name, tensors.type, metadata=metadata), tensors)
    return table


def write_parquet(dataset: Any, path: str, filesystem: Any = None, num_cpus: float | None = None) -> None:
    """Write a Ray Dataset to Parquet with its tensor columns as fixed-size binary.

    Give the `num_cpus` of the stage that makes the rows: with the same resources, Ray fuses the conversion
    and the write into that stage's tasks. Otherwise they are a stage of their own, and Ray Data splits the
    cluster's CPU budget between the two, which on a small machine runs one producing task at a time.
    """
    remote_args = {} if num_cpus is None else {"num_cpus": num_cpus}
    converted = dataset.map_batches(
        tensors_to_binary, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **remote_args
    )
    converted.write_parquet(path, filesystem=filesystem, ray_remote_args=remote_args)


def read_parquet(path: str, filesystem: Any = None, **kwargs: Any) -> Any:
    """A Ray Dataset of Parquet files written by `write_parquet`, tensor columns restored."""
    import ray.data

    dataset = ray.data.read_parquet(path, filesystem=filesystem, **kwargs)
    return dataset.map_batches(
        binary_to_tensors, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )


def _tensor_numpy(column: pa.ChunkedArray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if column.num_chunks == 0:
        return np.zeros((0, *shape), dtype)
    parts = [chunk.to_numpy() for chunk in column.chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
