"""A deliberately lenient SMTP backend that records every byte it receives.

It ends DATA on any line that is a lone dot whatever its line ending (``\\n.\\n``, ``\\r\\n.\\n``...),
as vulnerable MTAs did before the SMTP smuggling fixes, so a test can see whether a front end ever
lets such a body through. A fake by necessity: no real MTA installed here is vulnerable, and that is
exactly the behaviour under test. Runs in a thread on 127.0.0.1, port 0.
"""

from __future__ import annotations

import socket
import threading


class LenientBackend:
    """``drop_at_dot``: close the connection at the end of DATA without a reply (a crash at the worst time)."""

    def __init__(self, drop_at_dot: bool = False) -> None:
        self.drop_at_dot = drop_at_dot
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.raw = bytearray()
        self.messages = 0
        self.lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            conn.sendall(b"220 lenient ESMTP\r\n")
            buf = b""
            in_data = False
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self.lock:
                    self.raw += chunk
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.rstrip(b"\r")
                    if in_data:
                        if text == b"." or line == b".\r":
                            in_data = False
                            if self.drop_at_dot:
                                return
                            with self.lock:
                                self.messages += 1
                            conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                        continue
                    verb = text[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-lenient\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        in_data = True
                        conn.sendall(b"354 go\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 Ok\r\n")

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.thread.join(2)
