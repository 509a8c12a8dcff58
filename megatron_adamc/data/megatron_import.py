"""Import megatron-core's dataset code quietly and check its compiled helpers once, with a clear error.

Its package ``__init__`` warns about Transformer Engine/Apex, which the data path never uses. GPTDataset and
BlendedDataset need the C++ ``helpers_cpp`` extension: the PyPI wheel ships it prebuilt (nothing to compile); a
source checkout without it would fail deep inside index building, so it is checked up front.
"""

from __future__ import annotations

import warnings

from megatron_adamc.errors import DataError


def quiet_megatron_import() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        try:
            import megatron.core.datasets.helpers_cpp  # noqa: F401
        except ImportError:
            raise DataError(
                "megatron-core's compiled dataset helpers (helpers_cpp) are missing; install the megatron-core wheel "
                "or run `make -C megatron/core/datasets` in a Megatron-LM checkout"
            ) from None
