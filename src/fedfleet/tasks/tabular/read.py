"""A site's CSV and Parquet files, read in record batches, and its reproducible validation split.

Nothing here holds a whole file. ``scan`` reads each file once for what later reads need: its row
count and, for each column, whether it holds numbers or text. A CSV file is scanned with every column
read as text, because pyarrow's streaming reader infers types from the first block only: a column empty
there, or whole numbers there and decimals later, would stop the read halfway through the file. Later
reads give pyarrow the types the scan found.

Which rows are validation rows is a pure function of (seed, row index within the site), so train and
validation are disjoint and stable across reads and processes without a list of rows kept anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from fedfleet.errors import TaskError

FORMATS = {".csv": "csv", ".parquet": "parquet"}
NUMBER, STRING, EMPTY = "number", "string", "empty"  # a column's type in a file; EMPTY: no value seen
# pyarrow's streaming CSV reader reads up to 32 blocks ahead of the one it hands over: memory is about
# 32 blocks, whatever the file's size. Blocks are kept small for that, yet no line may be longer than one.
SCAN_BLOCK = 1 << 20  # bytes of a block while scanning: a line longer than this cannot be read
MAX_BLOCK = 1 << 22  # bytes of a block while reading, unless the file's longest line needs more
ARROW_ERRORS = (pa.ArrowException, OSError)


@dataclass(frozen=True)
class SourceFile:
    """One data file as scanned: its format, rows, and each column's type (in file order)."""

    path: Path
    format: str  # "csv" or "parquet"
    rows: int
    types: dict[str, str]  # NUMBER, STRING, EMPTY, or the arrow type of a column the task cannot read
    row_bytes: int  # CSV: about the longest line's length, so that no read block is smaller than a line
    size: int  # bytes on disk


@dataclass(frozen=True)
class SiteData:
    """One site's examples: some rows of its files, read only when a task asks for them.

    ``part`` is ``all``, ``train`` (the rows not kept for validation) or ``val``.
    """

    files: tuple[SourceFile, ...]
    part: str
    val_fraction: float
    seed: int
    rows: int

    def __len__(self) -> int:
        return self.rows

    @property
    def where(self) -> str:
        """The files, for messages: the one file, or the first and how many more."""
        first = str(self.files[0].path)
        return first if len(self.files) == 1 else f"{first} (and {len(self.files) - 1} more files)"


def find_files(paths: Sequence[Path]) -> list[Path]:
    """The data files ``paths`` name: each a file, or a folder whose *.csv and *.parquet files are taken, sorted
    by name."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            # Hidden files are left out: macOS's ._x.csv and editors' lock files are not data.
            inside = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in FORMATS and not p.name.startswith("."))
            if not inside:
                raise TaskError(f"{path}: a folder without .csv or .parquet files: expected the site's data in it")
            found += inside
        elif path.is_file():
            if path.suffix.lower() not in FORMATS:
                raise TaskError(f"{path}: not a CSV (.csv) or Parquet (.parquet) file")
            found.append(path)
        else:
            raise TaskError(f"{path}: no such file or folder")
    if not found:
        raise TaskError("no data files given: expected a CSV or Parquet file, or a folder of them")
    return found


def scan(path: Path) -> SourceFile:
    """Read ``path`` once for its rows and column types; TaskError names the file and what is wrong with it."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TaskError(f"{path}: not a CSV (.csv) or Parquet (.parquet) file")
    source = _scan_csv(path) if fmt == "csv" else _scan_parquet(path)
    if source.rows == 0:
        raise TaskError(f"{path}: no rows: expected a header and at least one row of data")
    return source


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _scan_csv(path: Path) -> SourceFile:
    try:
        with pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=SCAN_BLOCK)) as head:
            names = list(head.schema.names)
    except ARROW_ERRORS as exc:
        message = _first_line(exc)
        if message.startswith("Empty CSV file"):
            raise TaskError(f"{path}: empty file: expected a header row and rows of data") from exc
        raise TaskError(f"{path}: cannot read it as CSV: {message}") from exc
    _check_unique(path, names)
    number = dict.fromkeys(names, True)
    seen = dict.fromkeys(names, False)
    rows = 0
    row_bytes = sum(len(n.encode()) + 3 for n in names)  # the header line
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True)
    try:
        with pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=SCAN_BLOCK),
                             convert_options=convert) as reader:
            for batch in reader:
                rows += batch.num_rows
                lengths = np.zeros(batch.num_rows, dtype=np.int64)
                for name, column in zip(names, batch.columns, strict=True):
                    lengths += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False) + 3
                    if column.null_count == len(column):
                        continue
                    seen[name] = True
                    if number[name]:
                        number[name] = _all_numbers(column)
                if len(lengths):
                    row_bytes = max(row_bytes, int(lengths.max()))
    except ARROW_ERRORS as exc:
        if "straddl" in str(exc):
            raise TaskError(f"{path}: a line is longer than {SCAN_BLOCK >> 20} MiB: expected CSV rows of at most "
                            "that") from exc
        raise TaskError(f"{path}: cannot read it as CSV: {_first_line(exc)}") from exc
    types = {n: EMPTY if not seen[n] else NUMBER if number[n] else STRING for n in names}
    return SourceFile(path, "csv", rows, types, row_bytes, path.stat().st_size)


def _all_numbers(column: pa.Array) -> bool:
    try:
        pc.cast(column, pa.float64())
    except pa.ArrowInvalid:
        return False
    return True


def _check_unique(path: Path, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TaskError(f"{path}: column {name!r} appears twice: expected distinct column names")
        seen.add(name)


def _arrow_kind(kind: pa.DataType) -> str:
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return NUMBER
    if pa.types.is_dictionary(kind):
        return _arrow_kind(kind.value_type)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        return STRING
    if pa.types.is_null(kind):
        return EMPTY
    return str(kind)


def _scan_parquet(path: Path) -> SourceFile:
    try:
        meta = pq.ParquetFile(path)
        schema = meta.schema_arrow
        rows = meta.metadata.num_rows
    except ARROW_ERRORS as exc:
        raise TaskError(f"{path}: not a Parquet file: {_first_line(exc)}") from exc
    _check_unique(path, schema.names)
    types = {f.name: _arrow_kind(f.type) for f in schema}
    return SourceFile(path, "parquet", rows, types, 0, path.stat().st_size)


def load(paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[SiteData, SiteData | None]:
    """The site's files scanned and split: (training rows, validation rows or None when there are none)."""
    if not 0 <= val_fraction < 1:
        raise TaskError(f"the validation fraction must be in [0, 1). Got {val_fraction} instead.")
    files = tuple(scan(p) for p in find_files(paths))
    if val_fraction == 0:
        return SiteData(files, "all", 0.0, seed, sum(f.rows for f in files)), None
    val = _count_val(files, val_fraction, seed)
    total = sum(f.rows for f in files)
    train = SiteData(files, "train", val_fraction, seed, total - val)
    if train.rows == 0:
        raise TaskError(f"{train.where}: all {total} rows went to validation (val_fraction {val_fraction}): "
                        "expected more rows")
    return train, SiteData(files, "val", val_fraction, seed, val) if val else None


def _count_val(files: Sequence[SourceFile], fraction: float, seed: int) -> int:
    total, start, block = 0, 0, 1 << 20
    for f in files:
        for pos in range(0, f.rows, block):
            total += int(in_validation(seed, start + pos, min(block, f.rows - pos), fraction).sum())
        start += f.rows
    return total


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): consecutive inputs give independent-looking outputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def in_validation(seed: int, start: int, count: int, fraction: float) -> np.ndarray:
    """Whether each of the site's rows ``start`` .. ``start + count - 1`` is a validation row."""
    key = _mix(np.array([seed % 2**64], dtype=np.uint64))[0]
    index = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        u = _mix(index + key) >> np.uint64(11)  # the top 53 bits: a uniform double
    chosen: np.ndarray = u.astype(np.float64) * 2.0**-53 < fraction
    return chosen


def present(column: pa.ChunkedArray, kind: str) -> np.ndarray:
    """Which values of ``column`` (read as ``kind``) are there: not null and, for numbers, not NaN or ±Inf."""
    mask: np.ndarray
    if kind == NUMBER:
        mask = np.isfinite(column.to_numpy(zero_copy_only=False))
    else:
        mask = pc.is_valid(column).to_numpy(zero_copy_only=False)
    return mask


def check_types(data: SiteData, columns: Mapping[str, str]) -> None:
    """TaskError unless every file has ``columns`` and can be read as their types (NUMBER or STRING)."""
    for f in data.files:
        for name, wanted in columns.items():
            found = f.types.get(name)
            if found is None:
                raise TaskError(f"{f.path}: no column {name!r}: expected it, as the run reads {name!r} "
                                f"(its columns: {', '.join(f.types)})"[:1000])
            if found not in (NUMBER, STRING, EMPTY):
                raise TaskError(f"{f.path}: column {name!r} is {found}, which the tabular task does not read: "
                                f"leave it out with ignore={name}, or store it as numbers or text")
            if wanted == NUMBER and found == STRING:
                raise TaskError(f"{f.path}: column {name!r} holds text: the run reads it as numbers")


def read_chunks(data: SiteData, columns: Mapping[str, str], chunk_rows: int) -> Iterator[tuple[SourceFile, pa.Table]]:
    """``data``'s rows, a table of at most about ``chunk_rows`` rows at a time, with ``columns`` only, each
    as float64 (NUMBER: missing values are null) or string (STRING), with the file it came from."""
    check_types(data, columns)
    start = 0
    for f in data.files:
        offset = start
        for table in _read_file(f, columns, chunk_rows):
            n = table.num_rows
            if data.part != "all":
                val = in_validation(data.seed, offset, n, data.val_fraction)
                table = table.filter(pa.array(val if data.part == "val" else ~val))
            offset += n
            if table.num_rows:
                yield f, table
        start += f.rows


def _read_file(f: SourceFile, columns: Mapping[str, str], chunk_rows: int) -> Iterator[pa.Table]:
    arrow = {n: pa.float64() if t == NUMBER else pa.string() for n, t in columns.items()}
    try:
        if f.format == "csv":
            convert = pa_csv.ConvertOptions(column_types=arrow, include_columns=list(columns),
                                            strings_can_be_null=True)
            with pa_csv.open_csv(f.path, read_options=csv_blocks(f, chunk_rows), convert_options=convert) as reader:
                for batch in reader:
                    yield pa.Table.from_batches([batch])
        else:
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=chunk_rows, columns=list(columns)):
                yield pa.table({n: _cast(batch.column(n), arrow[n]) for n in columns})
    except ARROW_ERRORS as exc:
        raise TaskError(f"{f.path}: cannot read it: {_first_line(exc)}") from exc


def csv_blocks(f: SourceFile, chunk_rows: int) -> pa_csv.ReadOptions:
    """Blocks of about ``chunk_rows`` rows of ``f`` (fewer if that is over ``MAX_BLOCK``), never less than two of
    its longest line (pyarrow cannot parse a line that straddles two blocks)."""
    per_row = f.size / max(f.rows, 1)
    return pa_csv.ReadOptions(block_size=max(min(int(chunk_rows * per_row), MAX_BLOCK), 2 * f.row_bytes, 64))


def _cast(column: pa.Array, kind: pa.DataType) -> pa.Array:
    """A Parquet column as the CSV reader gives it: float64 (an int64 id beyond 2**53 rounded, not refused),
    or strings with "" missing."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if column.type != kind:
        column = pc.cast(column, kind, safe=False)
    if kind == pa.string():
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    return column
