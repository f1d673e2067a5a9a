"""An asyncio client for ClamAV's clamd: scan bytes over INSTREAM, and PING it, on a unix socket or TCP.

The protocol (clamd(8)): commands start with ``z`` so that every reply ends with a NUL byte. INSTREAM
sends the data as chunks, each preceded by its length as 4 bytes big-endian, and a zero length ends
it. clamd answers ``stream: OK``, ``stream: <name> FOUND`` or ``<reason> ERROR``.

Rules:
- One connection per call, closed at the end: clamd serves one command per connection without
  IDSESSION, and a fresh connection cannot be left in a half-read state by an earlier timeout.
- A failed send is not the end: clamd refuses a stream larger than its StreamMaxLength by replying
  and closing at once, so our next send fails (EPIPE, ECONNRESET) while its reply waits in our receive
  buffer. The client therefore stops sending and still reads the reply. It uses plain non-blocking
  sockets (``loop.sock_*``), because asyncio's stream transports close the socket on the first write
  error and that reply would be lost.
- ``timeout`` covers the whole call (connect, send, reply), as a deadline rather than per read.
- Errors: ``ClamdError`` and its subclasses, which are also the matching stdlib exceptions and carry
  ``transient`` (whether trying again, later or elsewhere, can help):

      ClamdError (vipd.errors.BackendError)
      ├── ClamdUnavailable    (also ConnectionError: cannot connect, reset, closed without a reply)
      ├── ClamdTimeout        (also TimeoutError: no reply within ``timeout``)
      ├── ClamdProtocolError  (a reply that is not clamd's)
      └── ClamdScanError      (clamd replied ERROR; ``transient`` is false for "size limit exceeded":
                               the same message would be refused again)

  ``clamd_ping`` returns False on all of these instead: it answers "is clamd up?".
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vipd.errors import BackendError

__all__ = ["DEFAULT_PORT", "ClamdError", "ClamdProtocolError", "ClamdResult", "ClamdScanError", "ClamdTimeout",
           "ClamdUnavailable", "clamd_ping", "clamd_scan", "clamd_version", "parse_scan_reply"]

DEFAULT_PORT = 3310
_CHUNK_LENGTH = struct.Struct(">I")
_END_OF_STREAM = _CHUNK_LENGTH.pack(0)
# clamd's replies are one short line; a longer one is not clamd, and must not fill our memory.
_MAX_REPLY_BYTES = 4096


class ClamdError(BackendError):
    """Talking to clamd failed; the message was not scanned."""


class ClamdUnavailable(ClamdError, ConnectionError):
    pass


class ClamdTimeout(ClamdError, TimeoutError):
    pass


class ClamdProtocolError(ClamdError):
    pass


class ClamdScanError(ClamdError):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.transient = "size limit exceeded" not in reply.lower()


@dataclass(frozen=True, slots=True)
class ClamdResult:
    infected: bool
    name: str | None
    raw: str                    # clamd's reply line, without the NUL


async def clamd_scan(data: bytes, *, unix_path: str | None = None, host: str | None = None,
                     port: int | None = None, timeout: float = 30.0, chunk_size: int = 65536) -> ClamdResult:
    """Scan ``data`` with INSTREAM; raises ClamdError (see the module docstring) when it is not scanned."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
    chunks = (view[i:i + chunk_size] for i in range(0, len(view), chunk_size))
    reply = await _call(b"zINSTREAM\0", chunks, unix_path, host, port, timeout)
    return parse_scan_reply(reply)


async def clamd_ping(*, unix_path: str | None = None, host: str | None = None, port: int | None = None,
                     timeout: float = 5.0) -> bool:
    """True when clamd answers PING with PONG; False when it cannot be reached or answers anything else."""
    try:
        return await _call(b"zPING\0", None, unix_path, host, port, timeout) == "PONG"
    except ClamdError:
        return False


async def clamd_version(*, unix_path: str | None = None, host: str | None = None, port: int | None = None,
                        timeout: float = 5.0) -> str:
    """clamd's VERSION reply, e.g. ``ClamAV 1.4.6/27000/Mon Jan 1 09:00:00 2026`` (engine/database/date)."""
    return await _call(b"zVERSION\0", None, unix_path, host, port, timeout)


def parse_scan_reply(reply: str) -> ClamdResult:
    """An INSTREAM reply as a result; ERROR and unknown replies raise."""
    if reply.endswith(" ERROR"):
        raise ClamdScanError(reply)
    # With IDSESSION clamd puts "<id>: " first; without it the reply starts "stream: ".
    path, sep, verdict = reply.rpartition(": ")
    if not sep or not path.endswith("stream"):
        raise ClamdProtocolError(f"unexpected clamd reply {reply[:200]!r}")
    if verdict == "OK":
        return ClamdResult(False, None, reply)
    if verdict.endswith(" FOUND") and verdict[:-6].strip():
        return ClamdResult(True, verdict[:-6].strip(), reply)
    raise ClamdProtocolError(f"unexpected clamd reply {reply[:200]!r}")


async def _call(command: bytes, stream: Iterable[memoryview] | None, unix_path: str | None, host: str | None,
                port: int | None, timeout: float) -> str:
    if (unix_path is None) == (host is None):
        raise ValueError("give either unix_path or host (with port), not both or neither")
    where = unix_path if unix_path is not None else f"{host}:{port or DEFAULT_PORT}"
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect(unix_path, host, port or DEFAULT_PORT, where)
            await _send(sock, command, stream)
            return await _read_reply(sock, where)
    except TimeoutError as exc:
        raise ClamdTimeout(f"clamd at {where}: no reply within {timeout} s") from exc
    finally:
        if sock is not None:
            sock.close()


async def _connect(unix_path: str | None, host: str | None, port: int, where: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    if unix_path is not None:
        targets = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, unix_path)]
    else:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ClamdUnavailable(f"clamd at {where}: cannot resolve: {exc}") from exc
        targets = [(family, kind, proto, address) for family, kind, proto, _, address in infos]
    error: OSError | None = None
    for family, kind, proto, address in targets:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                # The end-of-stream marker is 4 bytes: Nagle would hold it back for a delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
        except BaseException:
            sock.close()
            raise
    raise ClamdUnavailable(f"clamd at {where}: cannot connect: {error}") from error


async def _send(sock: socket.socket, command: bytes, stream: Iterable[memoryview] | None) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, command)
        if stream is None:
            return
        for chunk in stream:
            await loop.sock_sendall(sock, _CHUNK_LENGTH.pack(len(chunk)) + chunk)
        await loop.sock_sendall(sock, _END_OF_STREAM)
    except OSError:
        pass                    # clamd closed while we sent; its reply, if any, says why (module docstring)


async def _read_reply(sock: socket.socket, where: str) -> str:
    loop = asyncio.get_running_loop()
    raw = b""
    while b"\0" not in raw:
        try:
            data = await loop.sock_recv(sock, _MAX_REPLY_BYTES)
        except OSError as exc:
            raise ClamdUnavailable(f"clamd at {where}: {exc}") from exc
        if not data:
            if not raw:
                raise ClamdUnavailable(f"clamd at {where}: closed without a reply")
            break               # a clamd that ends replies with a newline instead: take it as it is
        raw += data
        if len(raw) > _MAX_REPLY_BYTES:
            raise ClamdProtocolError(f"clamd at {where}: reply longer than {_MAX_REPLY_BYTES} bytes")
    return raw.partition(b"\0")[0].rstrip(b"\r\n").decode("utf-8", "replace")
