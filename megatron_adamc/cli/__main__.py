"""``python -m megatron_adamc.cli ...``: the same as the ``megatron-adamc`` command (torchrun runs it this way)."""

import sys

from megatron_adamc.cli import main

sys.exit(main())
