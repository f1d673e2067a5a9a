"""Real sendmail as a backend: ``.mc`` generation for the email DMZ's layers, and instances on loopback ports.

``mc`` is pure (settings to text); ``instance`` builds, starts and stops ``SendmailInstance`` processes;
``python -m backends.sendmail`` runs one by hand.
"""

from .instance import (
    SendmailError,
    SendmailInstance,
    SendmailUnavailable,
    free_port,
    missing,
)
from .mc import NextHop, Settings, SettingsError, parse_next_hop, render, render_mc

__all__ = [
    "NextHop", "SendmailError", "SendmailInstance", "SendmailUnavailable", "Settings", "SettingsError",
    "free_port", "missing", "parse_next_hop", "render", "render_mc",
]
