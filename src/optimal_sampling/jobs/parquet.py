"""Parquet through pyarrow, an optional extra: one import point and one way to name its errors."""

from __future__ import annotations


def import_parquet():
    """pyarrow.parquet, or a ValueError naming the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError('Parquet needs pyarrow: pip install "optimal-sampling[io]"') from err
    return pq


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (pyarrow's run over several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
