"""The data layer's one error type.

It subclasses the CLI's ``UserError`` so that any command (preprocess, tokenizer, train) that hits a bad path or
a bad setting in here prints one line and exits 2, without each caller translating exceptions.
"""

from __future__ import annotations

from megatron_adamc.cli import UserError


class DataError(UserError):
    """Bad data input (missing file, wrong tokenizer, bad JSON): the message names the field and the fix."""
