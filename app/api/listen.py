"""The listening socket and the open-file limit, settled before anything slow happens.

`serve` binds its port first, before importing torch and long before the model loads: a busy
port used to be reported only after the whole model had loaded (and after a "ready" line), minutes
for a large model. This module imports nothing heavy so that the CLI can call it at once; uvicorn
is then handed the bound socket."""

from __future__ import annotations

import errno
import socket

BACKLOG = 2048  # uvicorn's default: connections the kernel queues before accept()


class ListenError(OSError):
    """The address cannot be listened on; the message says which and why, in one line."""


def bind_listener(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on host:port, or a ListenError naming the address and the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # as uvicorn does: a port whose last server left connections in TIME_WAIT is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        hint = (
            " (is another server running there? choose another --port)" if e.errno == errno.EADDRINUSE else ""
        )
        raise ListenError(f"cannot listen on {where}: {e.strerror or e}{hint}") from None
    return sock
