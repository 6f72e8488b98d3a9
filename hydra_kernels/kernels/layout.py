"""The stream layout of a batch of rows: S streams side by side, stream s = rows [s·m, (s+1)·m), m = rows / S.

Every backend of ops.lora_linear (the torch loop, the Triton and CUDA kernels) reads rows this way;
integrations.repeat_for_streams and decoder_forward build their batches so (input_ids.repeat(S, 1)).
"""
from __future__ import annotations

__all__ = ["rows_per_stream", "split_streams"]


def rows_per_stream(rows: int, n_streams: int) -> int:
    """m = rows / n_streams. Raises ValueError (naming stream_adapters, one adapter index per stream) unless
    n_streams ≥ 1 divides rows."""
    if n_streams < 1 or rows % n_streams:
        raise ValueError(f"stream_adapters: {rows} rows do not split into {n_streams} equal streams")
    return rows // n_streams


def split_streams(rows: int, n_streams: int) -> list[slice]:
    """The rows of each stream, [slice(s·m, (s+1)·m) for s in range(n_streams)]; raises as rows_per_stream."""
    m = rows_per_stream(rows, n_streams)
    return [slice(s * m, (s + 1) * m) for s in range(n_streams)]
