"""vipd.proxy parses the PROXY headers a real HAProxy (Debian's package) sends: v1, v2, v2 with TLVs.

HAProxy in TCP mode listens on a socket the test bound (``bind fd@N``) and relays to a plain Python
listener that records every byte it gets; a plain socket connects through HAProxy, and the recorded
header must name that socket's own address and port, and be followed by exactly what it sent.
Its health checks are recorded the same way. Skips when haproxy is missing, unless CI is set:
there a missing haproxy fails.
"""

from __future__ import annotations

import queue
import socket
import threading

import pytest

import haproxy_lab
from vipd.proxy import ProxyInfo, parse_proxy

PAYLOAD = b"EHLO client.test\r\nQUIT\r\n"
TLV_CRC32C, TLV_UNIQUE_ID = 0x03, 0x05


def loopback(family: socket.AddressFamily) -> str:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"no {host} on this host: {exc}")
    return host


class Recorder:
    """A plain listener that keeps the bytes of each connection, from accept to EOF or reset."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: queue.Queue[bytes] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="recorder", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                      # closed by close()
            with conn:
                conn.settimeout(10)
                data = b""
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                except OSError:
                    pass                    # HAProxy ends its health checks with a reset
                self.connections.put(data)

    def next(self, what: str) -> bytes:
        try:
            return self.connections.get(timeout=10)
        except queue.Empty:
            raise AssertionError(f"no connection reached the recorder: {what}") from None

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def recorder():
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.close()


def start_haproxy(lab, recorder: Recorder, family: socket.AddressFamily, server_options: str,
                  frontend_extra: str = "") -> tuple[str, int]:
    """HAProxy before the recorder; returns the (host, port) clients connect to. Stopped by PID by ``lab``."""
    host = loopback(family)
    _, port = haproxy_lab.start_haproxy(lab, f"""{haproxy_lab.DEFAULTS}
frontend smtp
    bind fd@{{fd}}
{frontend_extra}
    default_backend recorder

backend recorder
    server s 127.0.0.1:{recorder.port} {server_options}
""", host=host, family=family)
    return host, port


def through(host: str, port: int) -> tuple[str, int]:
    """Connect through HAProxy, send PAYLOAD, half-close, wait for the end; the client's own (ip, port)."""
    with socket.create_connection((host, port), timeout=10) as client:
        ours = client.getsockname()[:2]
        client.sendall(PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        while client.recv(4096):
            pass                            # the recorder has read to EOF once HAProxy closes this side
    return ours


def parse_recorded(data: bytes, lab) -> tuple[ProxyInfo, int]:
    result = parse_proxy(data)
    assert result is not None, f"incomplete header {data!r}\n{(lab.tmp / 'haproxy.log').read_text()}"
    info, used = result
    # Cut anywhere before its end, this real header is only ever "need more".
    assert all(parse_proxy(data[:cut]) is None for cut in range(used))
    return info, used


FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options, version, tlv_types", [
    pytest.param("send-proxy", 1, [], id="v1"),
    pytest.param("send-proxy-v2", 2, [], id="v2"),
    pytest.param("send-proxy-v2 proxy-v2-options crc32c,unique-id", 2, [TLV_CRC32C, TLV_UNIQUE_ID],
                 id="v2-crc32c-unique-id"),
])
def test_haproxy_headers_name_the_real_client(lab, recorder, family, options, version, tlv_types):
    host, port = start_haproxy(lab, recorder, family, options, frontend_extra="    unique-id-format vipd-%ci-%cp")
    client = through(host, port)
    data = recorder.next(f"a client through haproxy {options}")
    info, used = parse_recorded(data, lab)
    assert info.version == version
    assert info.command == "proxy"
    assert info.family == ("tcp4" if family == socket.AF_INET else "tcp6")
    assert info.source == (str(client[0]), client[1])
    assert info.destination == (host, port)
    assert [kind for kind, _ in info.tlvs] == tlv_types
    if TLV_UNIQUE_ID in tlv_types:
        assert dict(info.tlvs)[TLV_UNIQUE_ID] == f"vipd-{client[0]}-{client[1]}".encode()
    assert data[used:] == PAYLOAD


@pytest.mark.parametrize("options, crc", [
    pytest.param("send-proxy-v2", False, id="v2"),
    pytest.param("send-proxy-v2 proxy-v2-options crc32c", True, id="v2-crc32c"),
])
def test_haproxy_v2_health_checks_are_local(lab, recorder, options, crc):
    start_haproxy(lab, recorder, socket.AF_INET, f"{options} check check-send-proxy inter 100ms")
    data = recorder.next("a health check")
    info, used = parse_recorded(data, lab)
    assert info == ProxyInfo(2, "local", "unspec", None, None, info.tlvs)
    assert [kind for kind, _ in info.tlvs] == ([TLV_CRC32C] if crc else [])
    assert data[used:] == b""


def test_haproxy_v1_health_checks(lab, recorder):
    start_haproxy(lab, recorder, socket.AF_INET, "send-proxy check check-send-proxy inter 100ms")
    data = recorder.next("a health check")
    info, used = parse_recorded(data, lab)
    assert info.version == 1
    # Section 2.1 asks a balancer's checks for a valid line with the check's own endpoints (HAProxy 2.6
    # does that); an older sender may still say UNKNOWN.
    if info.command == "proxy":
        assert info.family == "tcp4" and info.destination == ("127.0.0.1", recorder.port)
        assert info.source is not None and info.source[0] == "127.0.0.1"
    else:
        assert info == ProxyInfo(1, "local", "unspec", None, None)
    assert data[used:] == b""
