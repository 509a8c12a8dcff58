"""A local TCP port for a rendezvous (process groups, Slurm daemons in the tests): the one helper everyone uses."""

from __future__ import annotations

import socket
from collections.abc import Container


def free_port(taken: Container[int] = ()) -> int:
    """A port the OS says is free right now and that is not in ``taken`` (ports handed out but not yet bound)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
