"""setuptools' PEP 517 backend, plus the two start-up files at the root of every wheel it builds, editable ones too.

setuptools has no way to put a file at the root of site-packages: package data lands inside the package, and an
editable (PEP 660) wheel holds only setuptools' own path hook. So both ``build_wheel`` (``pip install .``, Docker,
``python -m build``) and ``build_editable`` (``pip install -e .``, what ``launch/setup.sh`` runs) call setuptools and
then add ``megatron_adamc_autoload.pth`` and ``megatron_adamc_autoload.start`` (this folder) to the wheel and its
RECORD, so that pip installs them next to the package and removes them on uninstall. What they do:
``megatron_adamc/autoload.py``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every other hook is setuptools' own

HERE = Path(__file__).resolve().parent
STARTUP_FILES = ("megatron_adamc_autoload.pth", "megatron_adamc_autoload.start")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # reproducible entries


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def add_startup_files(wheel: Path) -> None:
    """Rewrites ``wheel`` with the start-up files at its root and their lines in RECORD (idempotent)."""
    files = {name: (HERE / name).read_bytes() for name in STARTUP_FILES}
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [row for row in csv.reader(io.StringIO(src.read(record_name).decode())) if row and row[0] not in files]
        for info in src.infolist():
            if info.filename != record_name and info.filename not in files:
                dst.writestr(info, src.read(info))
        for name, data in files.items():
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.external_attr = 0o644 << 16
            dst.writestr(info, data, zipfile.ZIP_DEFLATED)
            rows.insert(-1, [name, _record_hash(data), str(len(data))])  # RECORD's own row stays last
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        dst.writestr(src.getinfo(record_name), out.getvalue())
    os.replace(tmp, wheel)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_startup_files(Path(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_startup_files(Path(wheel_directory, name))
    return name
