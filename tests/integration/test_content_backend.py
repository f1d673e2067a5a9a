"""The content-security backend: the EICAR test file is stopped (plain, as a base64 attachment, by the
built-in scanner and by a real clamd), clean mail goes on to the next hop."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from backends.scanner import EICAR
from support import Lab, send_data, wait_for


def content_backend(lab: Lab, next_address: str, *extra: str, env: dict | None = None):
    """(port, process) of a content backend relaying to ``next_address``."""
    return lab.backend("content", "--next", next_address, *extra, env=env)


def plain_eicar() -> bytes:
    return b"Subject: plain\r\n\r\n" + EICAR + b"\r\n"


def attached_eicar() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.com", "attachment"
    msg.set_content("see the attachment\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.com")
    return msg.as_bytes(policy=__import__("email.policy").policy.SMTP)


@pytest.mark.parametrize("message", [plain_eicar, attached_eicar])
def test_the_builtin_scanner_stops_eicar_and_clean_mail_passes(lab: Lab, message) -> None:
    sink = lab.sink("next")
    port, _ = content_backend(lab, sink.address)
    code, text = send_data(port, message())
    assert (code, text[:5]) == (554, b"5.7.1") and b"Eicar" in text
    assert send_data(port, b"Subject: clean\r\n\r\nnothing to see\r\n")[0] == 250
    assert [m.body.count(b"nothing to see") for m in wait_for(lambda: sink.messages())] == [1]


def test_quarantine_keeps_it_and_accepts(lab: Lab) -> None:
    sink = lab.sink("next")
    port, _ = content_backend(lab, sink.address, "--quarantine", str(lab.tmp / "q"))
    code, text = send_data(port, attached_eicar())
    assert code == 250 and b"quarantined" in text
    kept = list((lab.tmp / "q").iterdir())
    assert len(kept) == 1 and b"X-Quarantine-Recipients: b@example.com" in kept[0].read_bytes()
    assert sink.messages() == []


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    from clamd_lab import run_clamd
    yield from run_clamd(tmp_path_factory)


def test_a_real_clamd_stops_what_it_knows(lab: Lab, clamd) -> None:
    sink = lab.sink("next")
    port, _ = content_backend(lab, sink.address, "--clamd", f"unix:{clamd.unix_path}")
    # The built-in scanner does not see this one (the string is not the whole file), clamd's
    # signature matches anywhere: so the refusal here is clamd's.
    code, text = send_data(port, b"Subject: hidden\r\n\r\nprefix " + EICAR + b" suffix\r\n")
    assert (code, text[:5]) == (554, b"5.7.1") and b"UNOFFICIAL" in text
    assert send_data(port, b"Subject: clean\r\n\r\nok\r\n")[0] == 250
    assert len(wait_for(lambda: sink.messages())) == 1
