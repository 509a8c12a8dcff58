"""Read documents from plain-text or JSONL files, the two inputs every data command accepts.

A ``.jsonl``/``.json`` file holds one JSON object per line and the document is ``obj[json_key]``; any other file
is one document as a whole (source code and prose keep their newlines). Shared by the tokenizer trainer and
preprocess so both see exactly the same text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from megatron_adamc.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def check_inputs(paths: Sequence[str], field: str = "--input") -> list[str]:
    """Fail early, before any output is touched, if an input is missing or unreadable."""
    if not paths:
        raise DataError(f"{field}: no input files given; pass one or more text or .jsonl files")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{field}: file not found: {path}; check the path")
        if not os.access(path, os.R_OK):
            raise DataError(f"{field}: file not readable: {path}; fix its permissions")
    return list(paths)


def check_first_record(paths: Sequence[str], json_key: str = "text") -> None:
    """Parse the first record of each JSONL file: a wrong ``--json-key`` fails before any work or output starts."""
    for path in paths:
        if is_jsonl(path):
            with open(path, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, start=1):
                    if line.strip():
                        parse_jsonl_line(line, json_key, path, line_no)
                        break


def iter_documents(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield each document's text, in file order then line order (deterministic)."""
    for path in paths:
        if not is_jsonl(path):
            with open(path, encoding="utf-8", errors="strict") as handle:
                try:
                    yield handle.read()
                except UnicodeDecodeError as err:
                    raise DataError(f"--input: {path} is not UTF-8 text ({err.reason}); convert it to UTF-8") from None
            continue
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield parse_jsonl_line(line, json_key, path, line_no)


def parse_jsonl_line(line: str, json_key: str, path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"--input: {path}:{line_no} is not valid JSON ({err.msg}); one JSON object per line") from None
    if not isinstance(record, dict) or json_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"--json-key: {path}:{line_no} has no key {json_key!r} (found {keys}); pass --json-key")
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(f"--json-key: {path}:{line_no} {json_key!r} is {type(text).__name__}, not a string")
    return text
