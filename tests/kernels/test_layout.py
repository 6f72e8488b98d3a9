"""kernels/layout.py: the stream row split every lora_linear backend reads, against the reference's own."""
from __future__ import annotations

import pytest

from hydra_kernels import reference
from hydra_kernels.kernels.layout import rows_per_stream, split_streams


@pytest.mark.parametrize("rows, S", [(0, 1), (7, 1), (12, 3), (15, 5), (1024, 4)])
def test_split_is_the_reference_split(rows, S):
    assert split_streams(rows, S) == reference.split_streams(rows, S)
    assert rows_per_stream(rows, S) * S == rows


@pytest.mark.parametrize("rows, S", [(7, 2), (5, 0), (3, -1)])
def test_rows_that_do_not_split_raise(rows, S):
    with pytest.raises(ValueError, match="^stream_adapters: "):
        rows_per_stream(rows, S)
    with pytest.raises(ValueError, match="^stream_adapters: "):
        split_streams(rows, S)
