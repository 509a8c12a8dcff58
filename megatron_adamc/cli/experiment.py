"""``megatron-adamc experiment NAME --output-dir DIR [--set key=value ...]``: run one small-scale reproduction."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from megatron_adamc.errors import UserError
from megatron_adamc.experiments import EXPERIMENTS, load


def parse_overrides(items: list[str], model: type[BaseModel]) -> BaseModel:
    """``key=value`` pairs (values read as YAML scalars, so 3000 is an int) validated by the experiment's Config."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: write it as key=value, e.g. --set steps_constant=1000")
        if key not in model.model_fields:
            raise UserError(f"--set {key}: unknown key; known keys: {', '.join(model.model_fields)}")
        values[key] = yaml.safe_load(raw) if raw else raw
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if not where:  # a check across fields: the message names them; the input is the whole config
            raise UserError(f"--set: {message}") from None
        raise UserError(f"--set {where}: {message} (got {first.get('input')!r})") from None


def run(args: argparse.Namespace) -> int:
    if args.name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; known experiments: {', '.join(EXPERIMENTS)}")
    module = load(args.name)
    config = parse_overrides(args.set, module.Config)
    results = module.run(config, Path(args.output_dir))
    print(json.dumps({k: results[k] for k in getattr(module, "HEADLINE_KEYS", ()) if k in results}))
    print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="run a small-scale reproduction of the papers")
    parser.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--output-dir", required=True, help="where results.json and the plots go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.set_defaults(func=run)
