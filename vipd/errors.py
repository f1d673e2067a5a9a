"""The exceptions vipd raises, in one tree.

    VipdError
    ├── ConfigError                 (vipd.config: a file that cannot be loaded; .errors lists each problem)
    └── BackendError                (talking to a backend failed; .transient says whether to retry)
        ├── BackendUnavailable      (connect refused, reset, closed early: try another server)
        ├── BackendTimeout          (also a TimeoutError: no reply in time)
        └── BackendProtocolError    (the backend did not speak SMTP)

Policy refusals are not exceptions but replies; protocol violations by clients are events of the
sans-IO machine (vipd.smtp.server.ProtocolViolation). Any other exception is a bug in vipd: it is caught
at the top of a session, logged with its traceback, and the client gets 421 4.3.0.
"""

from __future__ import annotations

__all__ = ["VipdError", "BackendError", "BackendUnavailable", "BackendTimeout", "BackendProtocolError"]


class VipdError(Exception):
    """Base of vipd's own exceptions."""


class BackendError(VipdError):
    transient = True


class BackendUnavailable(BackendError, ConnectionError):
    pass


class BackendTimeout(BackendError, TimeoutError):
    pass


class BackendProtocolError(BackendError):
    pass
