"""The steps of benchmarks/gpu_check.py, one module each, plus what they share (common, trainer_runs).

Each step module has ``run(ctx) -> bool | None`` (passed, failed, or skipped with ``ctx.figures["skipped"]``), and
``summary(record)`` / ``markdown(record)`` that format its record for the report.
"""
