"""Where webhooks may go: public addresses only, unless `M2FP_WEBHOOK_ALLOW` says
otherwise, so a submission cannot make the service call its own network (server-side
request forgery). Checked at submission, and again on every connection, which then
goes to the very address checked (a name that resolves elsewhere later changes nothing)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import WebhookRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def public(ip: IPAddress) -> bool:
    """Not loopback, private, link-local (169.254.169.254, the cloud metadata address, is
    one), multicast, reserved or unspecified; fd00:ec2::254 is private. An IPv4 address
    mapped into IPv6 is judged as itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class AddressPolicy:
    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, allow: str) -> "AddressPolicy":
        """`M2FP_WEBHOOK_ALLOW`: a comma list of CIDRs (or addresses) and host names."""
        networks, hosts = [], set()
        for entry in (e.strip() for e in allow.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, ip: IPAddress) -> bool:
        return public(ip) or any(ip in network for network in self.networks)

    def addresses(self, url: str) -> list[IPAddress]:
        """Every address the URL's host resolves to now, each one allowed; WebhookRefused
        when one is not (or the name does not resolve). A host named in the allow list
        may resolve anywhere."""
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise WebhookRefused(f"The webhook's host {host!r} does not resolve.") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in found))
        if host.lower() not in self.hosts:
            refused = [str(ip) for ip in addresses if not self.allows(ip)]
            if refused or not addresses:
                raise WebhookRefused(f"The webhook's host {host!r} resolves to an address the service "
                                     f"does not call ({', '.join(refused)}): loopback, private, "
                                     "link-local, multicast and reserved addresses are refused.")
        return addresses

