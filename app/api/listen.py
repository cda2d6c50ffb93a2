"""The listening socket and the open-file limit, settled before anything slow happens.

`serve` binds its port first, before importing torch and long before the model loads: a busy
port used to be reported only after the whole model had loaded (and after a "ready" line), minutes
for a large model. This module imports nothing heavy so that the CLI can call it at once; uvicorn
is then handed the bound socket.

Every connection costs a file descriptor, so the soft open-file limit is raised to the hard one
(the kernel allows that without privileges), and app/api/connections.py keeps the number of
connections below what is left."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import stat

log = logging.getLogger("shardserve.server")

BACKLOG = 2048  # uvicorn's default: connections the kernel queues before accept()
# Descriptors the server needs besides its connections and those open at start-up: two per rank
# (pipe and process sentinel), the shared-memory segment, files read while loading, the event
# loop's own; generous, since running out fails accept() for everyone.
FD_RESERVE = 64
MIN_DEFAULT_CONNECTIONS = 1000
MAX_DEFAULT_CONNECTIONS = 65536  # idle ones hold 4.6 KB each in this process (measured): 300 MB
MAX_ACCEPT_BATCH = 128  # connections accepted per wake-up at most (asyncio's default is 100)
ACCEPT_BURSTS = 3  # batches accepted before the first of them is counted (see connection_budget)


class ListenError(OSError):
    """The address cannot be listened on; the message says which and why, in one line."""


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux caps descriptors at fs.nr_open anyway
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. a hard limit above fs.nr_open
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def open_fds() -> int:
    """Descriptors this process holds now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a fresh process
        return 16


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


def connection_budget(configured: int | None, nofile: int) -> tuple[int, int]:
    """(connection cap, accept batch) that the open-file limit allows.

    asyncio accepts up to a batch of connections per wake-up of the listening socket before any of
    them is counted (their protocols start on later loop iterations), so a few batches' worth of
    descriptors is kept free beyond the cap: running out makes accept() fail with EMFILE for
    everyone, and asyncio then accepts nothing for a second. (The kernel's queue of connections
    not yet accepted costs no descriptor and stays BACKLOG long.) The cap is --max-connections, or
    by default what is left (at least MIN_DEFAULT_CONNECTIONS, at most MAX_DEFAULT_CONNECTIONS),
    and never more than what is left."""
    room = max(1, nofile - open_fds() - FD_RESERVE)
    batch = min(MAX_ACCEPT_BATCH, max(8, room // 8))
    room = max(1, room - ACCEPT_BURSTS * batch)
    want = (
        configured
        if configured is not None
        else max(MIN_DEFAULT_CONNECTIONS, min(room, MAX_DEFAULT_CONNECTIONS))
    )
    if want > room:
        log.warning(
            "the open-file limit (%d) leaves room for %d connections only, fewer than %d: raise the "
            "hard limit (ulimit -Hn) to allow more", nofile, room, want,
        )  # fmt: skip
        want = room
    return want, batch


def bind_unix_listener(path: str, backlog: int = BACKLOG) -> socket.socket:
    """A listening Unix domain socket at `path` (--uds), or a ListenError. A socket file nobody
    listens on any more (its server was killed) is replaced; one a server still answers on is not."""
    where = f"the Unix socket {path}"
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ListenError(f"cannot listen on {where}: a file that is not a socket is there")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise ListenError(f"cannot listen on {where}: another server is listening there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # as uvicorn's --uds: any local user may connect (a proxy runs as another user); the
        # directory's permissions are what restrict it
        os.chmod(path, 0o666)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {where}: {e.strerror or e}") from None
    return sock


def listen_on(host: str, port: int, uds: str | None) -> socket.socket:
    """serve's listening socket: the Unix socket --uds if given, else TCP on --host and --port."""
    return bind_unix_listener(uds) if uds else bind_listener(host, port)
