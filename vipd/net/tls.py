"""TLS for the VIPs (STARTTLS, RFC 3207): server contexts from the config, and what a session records.

Rules: TLS 1.2 at least; for TLS 1.2 only forward-secret AEAD suites (TLS 1.3's are all of that kind);
no compression, no renegotiation; the server's cipher preference wins. A client certificate is asked
for only when ``tls_client_ca`` is set, and never required (an MX must take mail from anyone).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..config import VipConfig

__all__ = ["TlsInfo", "server_context", "tls_info"]

# Mozilla's "intermediate" list for TLS 1.2, in OpenSSL's names.
_TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                  "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                  "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")


def server_context(vip: VipConfig) -> ssl.SSLContext | None:
    """The VIP's STARTTLS context, or None when it offers no TLS. Raises OSError/ssl.SSLError."""
    if vip.tls_cert is None or vip.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(vip.tls_cert, vip.tls_key)
    if vip.tls_client_ca is not None:
        ctx.load_verify_locations(vip.tls_client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str            # "TLSv1.3"
    cipher: str             # "TLS_AES_256_GCM_SHA384"
    bits: int
    peer_subject: str | None = None   # the client certificate's subject CN, when one was verified

    def received_clause(self) -> str:
        """Postfix's wording in the Received: header."""
        return f"(using {self.version} with cipher {self.cipher} ({self.bits}/{self.bits} bits))"


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TlsInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name, version, bits = cipher
    subject = None
    cert = ssl_object.getpeercert()
    if cert:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    subject = value
    return TlsInfo(ssl_object.version() or version, name, int(bits or 0), subject)
