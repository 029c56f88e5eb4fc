"""One data file cut into per-site files (``fedfleet run --data-split FILE``), to try the tabular task on
one machine: ``site-000.csv``, ``site-001.csv``, ... in the input's format, each holding the rows
``fedfleet.partition.split`` gives that site (iid, or dirichlet:ALPHA label skew), in the file's order.
``natural:COLUMN`` keeps each of the column's values (a hospital, a region) whole at one site, the
values spread so that the sites' rows are as even as whole groups allow; only with fewer values than
sites are groups cut, into ``fedfleet.partition.split``'s contiguous shards of the rows sorted by group.

A CSV file's cells are copied as the text they are (the writer quotes every text cell, which CSV
readers undo); a Parquet file's columns keep their types.

Only the label and group columns are held in memory (to split by); the rows are streamed through.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec, split
from fedfleet.tasks.tabular.describe import CLASS_LIMIT
from fedfleet.tasks.tabular.read import ARROW_ERRORS, SourceFile, csv_blocks, scan

CHUNK_ROWS = 65_536


def split_file(path: Path, out_dir: Path, count: int, spec: PartitionSpec, label: str, seed: int,
               group_column: str | None = None) -> list[Path]:
    """Write ``path``'s rows into ``count`` files ``out_dir/site-000.csv`` ... (or ``.parquet``) as
    ``spec`` splits them (``group_column`` holds the groups of ``natural``); the files written."""
    source = scan(Path(path))
    for column in (label, group_column):
        if column is not None and column not in source.types:
            raise TaskError(f"{source.path}: no column {column!r}: expected it, to split by "
                            f"(its columns: {', '.join(source.types)})"[:1000])
    if spec.scheme == "natural" and group_column is None:
        raise TaskError(f"{source.path}: the natural partition splits by a column's values: name it, "
                        "natural:COLUMN")
    labels, classes = _codes(source, label)
    if spec.scheme == "dirichlet" and classes > CLASS_LIMIT:
        raise TaskError(f"{source.path}: label {label!r} has {classes} distinct values, and dirichlet splits "
                        f"by class (at most {CLASS_LIMIT}): use iid or natural:COLUMN")
    groups, values = _codes(source, group_column) if group_column is not None else (None, 0)
    if groups is not None and values >= count:
        site = whole_groups(groups, count)
    else:
        try:
            parts = split(labels, groups, spec, count, seed)
        except ValueError as exc:
            raise TaskError(f"{source.path}: {exc}") from exc
        site = np.empty(source.rows, dtype=np.int64)
        for i, part in enumerate(parts):
            site[part] = i
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / f"site-{i:03d}.{source.format}" for i in range(count)]
    _write(source, site, outputs)
    return outputs


def whole_groups(groups: np.ndarray, count: int) -> np.ndarray:
    """Each row's site, keeping every group (code) at one site: the largest group first to the site with
    the fewest rows so far (ties to the lower code and site), so every site gets one when there are at
    least ``count`` groups."""
    codes, sizes = np.unique(groups, return_counts=True)
    load = np.zeros(count, dtype=np.int64)
    site_of: dict[int, int] = {}
    for j in np.lexsort((codes, -sizes)):
        target = int(np.argmin(load))
        site_of[int(codes[j])] = target
        load[target] += sizes[j]
    lookup = np.array([site_of[int(c)] for c in codes], dtype=np.int64)
    site: np.ndarray = lookup[np.searchsorted(codes, groups)]
    return site


def _tables(source: SourceFile, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """``source``'s rows a chunk at a time: a CSV file's cells as their exact text, a Parquet file's as stored."""
    try:
        if source.format == "csv":
            names = list(source.types)
            convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), null_values=[],
                                            strings_can_be_null=False, include_columns=columns or names)
            with pa_csv.open_csv(source.path, read_options=csv_blocks(source, CHUNK_ROWS),
                                 convert_options=convert) as reader:
                for batch in reader:
                    yield pa.Table.from_batches([batch])
        else:
            for batch in pq.ParquetFile(source.path).iter_batches(batch_size=CHUNK_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])
    except ARROW_ERRORS as exc:
        raise TaskError(f"{source.path}: cannot read it: {exc}") from exc


def _codes(source: SourceFile, column: str) -> tuple[np.ndarray, int]:
    """Each row's value of ``column`` as an integer code (-1 for a missing value), and how many values there are."""
    values = pa.chunked_array([t.column(column) for t in _tables(source, [column])]).combine_chunks()
    encoded = values.dictionary_encode()
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, len(encoded.dictionary)


def _write(source: SourceFile, site: np.ndarray, outputs: list[Path]) -> None:
    start = 0
    with ExitStack() as stack:
        writers: list[pa_csv.CSVWriter | pq.ParquetWriter] = []
        for table in _tables(source):
            if not writers:
                for out in outputs:
                    writer = (pa_csv.CSVWriter(out, table.schema) if source.format == "csv"
                              else pq.ParquetWriter(out, table.schema))
                    writers.append(stack.enter_context(writer))
            assigned = site[start:start + table.num_rows]
            start += table.num_rows
            order = np.argsort(assigned, kind="stable")  # each site's rows together, in the file's order
            bounds = np.searchsorted(assigned[order], np.arange(len(outputs) + 1))
            for i, writer in enumerate(writers):
                if bounds[i] < bounds[i + 1]:
                    writer.write_table(table.take(pa.array(order[bounds[i]:bounds[i + 1]])))
