"""Text records from JSON-lines and Parquet files: the string `field` of every record, in file order.

A JSON-lines file holds one JSON object per line (blank lines are skipped); a Parquet file holds a table with a
string column `field` (read with pyarrow, which is optional: `pip install pyarrow`). The "text" source and the
sources built on it turn the records into a byte corpus with `data.format="jsonl"` or `"parquet"` and
`data.field` (default "text"); see `train.data.text.load_corpus`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

RECORD_FORMATS = ("jsonl", "parquet")


def _field_text(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: the record has no field={field!r} (its keys: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field={field!r} must be a string, got {type(value).__name__}")
    return value


def read_jsonl(file: Path, field: str) -> list[str]:
    """The `field` strings of the records of JSON-lines `file`, in order; a bad line raises ValueError naming it."""
    texts = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number} is not a JSON object ({error.msg}); expected JSON lines") from None
            texts.append(_field_text(record, field, f"{file}:{number}"))
    return texts


def read_parquet(file: Path, field: str) -> list[str]:
    """The strings of column `field` of Parquet `file`, in row order (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"data.format='parquet' ({file}) needs pyarrow, which is not installed: pip install pyarrow"
        ) from None
    schema = pq.read_schema(file)
    if field not in schema.names:
        raise ValueError(f"{file}: the table has no column field={field!r} (its columns: {schema.names})")
    texts = pq.read_table(file, columns=[field]).column(field).to_pylist()
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{file} row {row}: field={field!r} must be a string, got {type(text).__name__}")
    return texts


def read_records(files: Sequence[Path], format: str, field: str) -> list[str]:
    """The `field` strings of every record of `files` (in the given order) in `format` ("jsonl" or "parquet")."""
    if format not in RECORD_FORMATS:
        raise ValueError(f"format={format!r} must be one of {RECORD_FORMATS}")
    if not isinstance(field, str) or not field:
        raise ValueError(f"field={field!r} must be a non-empty string (the record field holding the text)")
    reader = read_jsonl if format == "jsonl" else read_parquet
    return [text for file in files for text in reader(file, field)]
