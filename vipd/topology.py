"""The email DMZ's three switched designs as data: which layers, which VIP in front of each, what each
layer's Python backends run, and the vipd config that ties them together on loopback.

- ``scenario1``: incoming pool -> one combined content-security + delivery pool.
- ``scenario2``: incoming -> content security -> delivery, three pools.
- ``scenario3``: incoming -> content security (vendor A) -> content security (vendor B) -> delivery.

Every layer sits behind its own VIP; the Internet-facing one (``mx``) accepts mail for the internal
domain from anyone and relays nothing else; the inner VIPs take mail from loopback, where the layers
and the internal hosts are (internal hosts submit to the first content VIP, so their outbound and
internal mail is scanned too). Delivery routes by mailertable: the internal domain to the internal
gateway, everything else to an outbound next hop. Pure: ports in, text and command lines out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INTERNAL_DOMAIN", "Layer", "SCENARIOS", "backend_command", "vipd_config", "write_maps"]

INTERNAL_DOMAIN = "example.com"


@dataclass(frozen=True, slots=True)
class Layer:
    name: str          # also the VIP's and the pool's name ("mx" for the Internet-facing one)
    role: str          # "incoming", "content", "content+delivery" or "delivery"
    servers: int = 2


SCENARIOS: dict[str, tuple[Layer, ...]] = {
    "scenario1": (Layer("mx", "incoming"), Layer("content", "content+delivery")),
    "scenario2": (Layer("mx", "incoming"), Layer("content", "content"), Layer("delivery", "delivery")),
    "scenario3": (Layer("mx", "incoming"), Layer("content", "content"), Layer("content2", "content"),
                  Layer("delivery", "delivery")),
}
DESCRIPTIONS = {
    "scenario1": "incoming pool, then a combined content-security and delivery pool",
    "scenario2": "incoming, content-security and delivery pools",
    "scenario3": "incoming, two content-security pools in series (two vendors), delivery",
}


def write_maps(folder: Path) -> dict[str, Path]:
    """The access map of the Internet-facing VIP and the delivery layer's mailertable."""
    folder.mkdir(parents=True, exist_ok=True)
    access = folder / "access"
    access.write_text("# sendmail access syntax\nFrom:spammer@bad.example\tERROR:550 5.7.1 Go away\n")
    mailertable = folder / "mailertable"
    mailertable.write_text(f"{INTERNAL_DOMAIN}\tgateway\n.{INTERNAL_DOMAIN}\tgateway\n.\toutbound\n")
    return {"access": access, "mailertable": mailertable}


def vipd_config(scenario: str, vip_ports: dict[str, int], backend_ports: dict[str, list[int]], *,
                maps: dict[str, Path], admin_port: int = 0, spool_dir: Path | None = None,
                extra_mx: str = "", top: str = "") -> str:
    """One vipd config: a VIP and a pool per layer."""
    out = [top]
    if spool_dir is not None:
        out.append(f'spool_dir = "{spool_dir}"\n')
    for layer in SCENARIOS[scenario]:
        if layer.name == "mx":
            policy = (f'relay_domains = ["{INTERNAL_DOMAIN}", ".{INTERNAL_DOMAIN}"]\n'
                      f'access = "{maps["access"]}"\n{extra_mx}')
        else:
            policy = 'trusted_networks = ["127.0.0.0/8", "::1/128"]   # the layers and the internal hosts\n'
        servers = ", ".join(f'{{ address = "127.0.0.1:{p}", name = "{layer.name}{i + 1}" }}'
                            for i, p in enumerate(backend_ports[layer.name]))
        out.append(f"""
[vip.{layer.name}]
listen = ["127.0.0.1:{vip_ports[layer.name]}"]
hostname = "{layer.name}.dmz.vipd.test"
default_pool = "{layer.name}"
{policy}
[pool.{layer.name}]
balance = "leastconn"
servers = [{servers}]
health = {{ interval_seconds = 1.0, rise = 2, fall = 2 }}
""")
    out.append(f'\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n')
    return "".join(out)


def backend_command(scenario: str, layer_name: str, index: int, port: int, vip_ports: dict[str, int],
                    sinks: dict[str, str], maps: dict[str, Path], clamd: str | None = None) -> list[str]:
    """The command line of one Python backend of a layer (``sinks``: gateway and outbound addresses)."""
    layers = SCENARIOS[scenario]
    names = [layer.name for layer in layers]
    layer = layers[names.index(layer_name)]
    following = names[names.index(layer_name) + 1] if layer_name != names[-1] else None
    host = f"{layer.name}{index + 1}.dmz.vipd.test"
    common = ["--listen", f"127.0.0.1:{port}", "--hostname", host, "--xclient-from", "127.0.0.0/8"]
    route = ["--mailertable", str(maps["mailertable"]), "--hop", f"gateway={sinks['gateway']}",
             "--hop", f"outbound={sinks['outbound']}"]
    scan = ["--clamd", clamd] if clamd else []
    py = [sys.executable, "-m"]
    if layer.role in ("incoming", "content"):
        assert following is not None, f"{scenario}: {layer_name} needs a layer after it"
        module = "backends.relay" if layer.role == "incoming" else "backends.content"
        extra = scan if layer.role == "content" else []
        return [*py, module, *common, *extra, "--next", f"127.0.0.1:{vip_ports[following]}"]
    if layer.role == "content+delivery":
        return [*py, "backends.content", *common, *scan, *route]
    return [*py, "backends.delivery", *common, *route]
