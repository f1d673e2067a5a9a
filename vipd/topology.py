"""The email DMZ's switched designs as data: read a topology file (``conf/scenarioN/topology.toml``) and
turn it into the vipd config and the backends' command lines that make it run.

A topology names its layers in the order mail crosses them, each behind its own VIP with a pool of
backends: an ``incoming`` layer first (its VIP, ``mx``, faces the Internet: it accepts mail for the
internal domain from anyone, refuses relaying, consults the access map and the DNSBL), then one or
more ``content`` layers (scanning), and last a ``delivery`` layer (mailertable: the internal domain to
the internal gateway, everything else to the outbound next hop) or a ``content+delivery`` layer doing
both. The inner VIPs take mail from loopback, where the layers and the internal hosts are; internal
hosts submit to the first content VIP, so their outbound and internal mail is scanned too.

Addresses in the file are the reference deployment's; the lab and the tests swap in free ports.
Everything here is pure: files and ports in, text and command lines out.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .config import ConfigError, load_table, parse_endpoint

__all__ = ["CONF_DIR", "Layer", "Topology", "backend_command", "load", "load_scenario", "render",
           "scenario_names", "vipd_config"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
Role = Literal["incoming", "content", "content+delivery", "delivery"]
Scanner = Literal["builtin", "clamd", "builtin+clamd"]
SpamAction = Literal["tag", "reject"]
_CONTENT_ROLES = ("content", "content+delivery")


def _endpoint(text: str) -> str:
    parse_endpoint(text)
    return text


def _address(text: str) -> str:
    ipaddress.ip_address(text)
    return text


Address = Annotated[str, AfterValidator(_endpoint)]


class _Table(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _LayerTable(_Table):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]
    role: Role
    vip: Address
    servers: Annotated[tuple[Address, ...], Field(min_length=1, strict=False)]
    scanner: Scanner | None = None
    spam: Literal["spamd"] | None = None
    spam_action: SpamAction | None = None


class _TopologyTable(_Table):
    description: str
    internal_domain: str
    access: str
    mailertable: str
    gateway: Address
    outbound: Address
    admin: Address
    nameserver: Address
    dnsbl_zone: str
    dnsbl_listed: Annotated[tuple[Annotated[str, AfterValidator(_address)], ...], Field(strict=False)] = ()
    layer: Annotated[tuple[_LayerTable, ...], Field(min_length=2, strict=False)]


@dataclass(frozen=True, slots=True)
class Layer:
    name: str                   # also its VIP's and its pool's name
    role: str
    vip: str                    # the reference deployment's address
    servers: tuple[str, ...]    # likewise
    scanner: str | None         # content roles: "builtin", "clamd" or "builtin+clamd"
    spam: str | None = None     # content roles: "spamd" scores clean mail, None does not
    spam_action: str = "tag"    # what a spam verdict does: "tag" (X-Spam-* headers) or "reject"

    @property
    def scans(self) -> bool:
        return self.role in _CONTENT_ROLES


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    file: Path
    description: str
    internal_domain: str
    access: Path                # the Internet-facing VIP's access map (sendmail syntax)
    mailertable: Path           # the delivery layer's routes to the named hops "gateway" and "outbound"
    gateway: str
    outbound: str
    admin: str
    nameserver: str             # the lab's own DNS server, which holds the DNSBL zone
    dnsbl_zone: str
    dnsbl_listed: tuple[str, ...]
    layers: tuple[Layer, ...]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> Layer:
        return self.layers[self.names.index(name)]

    def following(self, name: str) -> str | None:
        """The layer after ``name``, where it relays to (None for the last)."""
        index = self.names.index(name)
        return self.names[index + 1] if index + 1 < len(self.names) else None

    def without_spam(self) -> Topology:
        """The same topology with no layer scoring spam."""
        return replace(self, layers=tuple(replace(layer, spam=None) for layer in self.layers))

    def with_scanner(self, scanner: str) -> Topology:
        """The same topology with every content layer scanning with ``scanner``."""
        return replace(self, layers=tuple(replace(layer, scanner=scanner) if layer.scans else layer
                                          for layer in self.layers))


def scenario_names() -> list[str]:
    return sorted(p.parent.name for p in CONF_DIR.glob("*/topology.toml"))


def load_scenario(name: str) -> Topology:
    return load(CONF_DIR / name / "topology.toml")


def load(path: Path) -> Topology:
    """Read and check a topology file; ConfigError names the file, the key and what is wrong."""
    path = Path(path)
    table = load_table(path, _TopologyTable)
    problems = [f"{path}: {key}: {reason}" for key, reason in _order_problems(table)]
    names = [layer.name for layer in table.layer]
    for i, name in enumerate(names):
        if names.index(name) != i:
            problems.append(f"{path}: layer[{i}].name: {name!r} is used by layer[{names.index(name)}] already")
    for kind in ("access", "mailertable"):
        if not (path.parent / getattr(table, kind)).is_file():
            problems.append(f"{path}: {kind}: no such file: {path.parent / getattr(table, kind)}")
    if problems:
        raise ConfigError(problems)
    layers = tuple(Layer(t.name, t.role, t.vip, t.servers,
                         (t.scanner or "builtin") if t.role in _CONTENT_ROLES else None, t.spam,
                         t.spam_action or "tag") for t in table.layer)
    return Topology(path.parent.name, path, table.description, table.internal_domain.lower(),
                    (path.parent / table.access).absolute(), (path.parent / table.mailertable).absolute(),
                    table.gateway, table.outbound, table.admin, table.nameserver, table.dnsbl_zone.lower(),
                    table.dnsbl_listed, layers)


def _order_problems(table: _TopologyTable) -> list[tuple[str, str]]:
    """Mail crosses incoming, then content layers, then ends at delivery: anything else cannot work."""
    layers, out = table.layer, []
    if layers[0].role != "incoming" or layers[0].name != "mx":
        out.append(("layer[0]", 'the first layer must be the Internet-facing one: name = "mx", role = "incoming"'))
    for i, layer in enumerate(layers[1:-1], start=1):
        if layer.role != "content":
            out.append((f"layer[{i}].role", f'a layer in the middle must be "content", got "{layer.role}"'))
    if layers[-1].role not in ("delivery", "content+delivery"):
        out.append((f"layer[{len(layers) - 1}].role",
                     f'the last layer must be "delivery" or "content+delivery", got "{layers[-1].role}"'))
    if not any(layer.role in _CONTENT_ROLES for layer in layers):
        out.append(("layer", "no content-security layer: mail would pass unscanned"))
    for i, layer in enumerate(layers):
        for key in ("scanner", "spam"):
            if getattr(layer, key) is not None and layer.role not in _CONTENT_ROLES:
                out.append((f"layer[{i}].{key}", f'only content layers scan; this one is "{layer.role}"'))
        if layer.spam_action is not None and layer.spam is None:
            out.append((f"layer[{i}].spam_action", 'no spam scorer to act on: set spam = "spamd" too'))
    return out


def vipd_config(topo: Topology, vips: dict[str, str], servers: dict[str, list[str]], *, nameserver: str,
                admin: str, access: str | Path | None = None, spool_dir: str | Path | None = None,
                extra_mx: str = "", top: str = "") -> str:
    """One vipd config: a VIP and a pool per layer (``vips``/``servers``: addresses by layer name)."""
    out = [top]
    if spool_dir is not None:
        out.append(f'spool_dir = "{spool_dir}"\n')
    out.append(f'nameservers = ["{nameserver}"]          # the DNS that holds the DNSBL zone\n')
    domain = topo.internal_domain
    for layer in topo.layers:
        if layer.name == "mx":
            policy = (f'relay_domains = ["{domain}", ".{domain}"]   # accepted from anyone; nothing else relayed\n'
                      f'access = "{access or topo.access}"\n'
                      f'dnsbl = [{{ zone = "{topo.dnsbl_zone}" }}]\n'
                      "check_sender_domain = false   # mail from any sender: the lab has no outside DNS\n"
                      f"{extra_mx}")
        else:
            policy = 'trusted_networks = ["127.0.0.0/8", "::1/128"]   # the layers and the internal hosts\n'
        listed = ", ".join(f'{{ address = "{a}", name = "{layer.name}-{i + 1}" }}'
                           for i, a in enumerate(servers[layer.name]))
        out.append(f"""
[vip.{layer.name}]
listen = ["{vips[layer.name]}"]
hostname = "{layer.name}.dmz.vipd.test"
default_pool = "{layer.name}"
{policy}
[pool.{layer.name}]
balance = "leastconn"
servers = [{listed}]
health = {{ interval_seconds = 1.0, rise = 2, fall = 2 }}
""")
    out.append(f'\n[admin]\nlisten = "{admin}"\n')
    return "".join(out)


def render(topo: Topology) -> str:
    """The reference deployment's vipd.toml, as kept beside the topology file in conf/."""
    head = (f"# {topo.name}: {topo.description}.\n"
            f"# Written from topology.toml by `vipd lab {topo.name} --write-config`; edit that file instead.\n"
            "# The addresses are the reference deployment's; `vipd lab` runs the same on free ports.\n")
    return vipd_config(topo, {layer.name: layer.vip for layer in topo.layers},
                       {layer.name: list(layer.servers) for layer in topo.layers},
                       nameserver=topo.nameserver, admin=topo.admin, access=topo.access.name,
                       top=head + '# spool_dir = "/var/spool/vipd"   # the durable failover queue\n'
                       '# state_file = "/var/lib/vipd/state.json"   # operator holds and drains survive restarts\n')


def backend_command(topo: Topology, layer_name: str, index: int, listen: str, vips: dict[str, str],
                    sinks: dict[str, str], clamd: str | None = None, extra: tuple[str, ...] = (),
                    spamd: str | None = None) -> list[str]:
    """The command line of one Python backend of a layer (``vips``, ``sinks``: the running addresses;
    ``clamd``, ``spamd``: the daemons' addresses, needed when the layer uses them)."""
    layer = topo.layer(layer_name)
    following = topo.following(layer_name)
    common = ["--listen", listen, "--hostname", f"{layer.name}-{index + 1}.dmz.vipd.test",
              "--xclient-from", "127.0.0.0/8", *extra]
    route = ["--mailertable", str(topo.mailertable), "--hop", f"gateway={sinks['gateway']}",
             "--hop", f"outbound={sinks['outbound']}"]
    py = [sys.executable, "-m"]
    if layer.role == "incoming":
        assert following is not None
        return [*py, "backends.relay", *common, "--next", vips[following]]
    if layer.role == "delivery":
        return [*py, "backends.delivery", *common, *route]
    scan = scanner_options(layer.scanner or "builtin", clamd)
    if layer.spam is not None:
        if spamd is None:
            raise ValueError(f'layer {layer.name}: spam "{layer.spam}" needs a spamd address')
        scan += ["--spamd", spamd, "--spam-action", layer.spam_action]
    if layer.role == "content":
        assert following is not None
        return [*py, "backends.content", *common, *scan, "--next", vips[following]]
    return [*py, "backends.content", *common, *scan, *route]


def scanner_options(scanner: str, clamd: str | None) -> list[str]:
    """The content backend's options for a scanner choice; clamd's address is needed when it is used."""
    if "clamd" in scanner and clamd is None:
        raise ValueError(f'scanner "{scanner}" needs a clamd address')
    return {"builtin": [], "clamd": ["--no-builtin", "--clamd", str(clamd)],
            "builtin+clamd": ["--clamd", str(clamd)]}[scanner]
