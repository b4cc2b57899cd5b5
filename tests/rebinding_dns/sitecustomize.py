"""Loaded by a test server started with this directory on PYTHONPATH: a DNS rebinding
attack, simulated. `rebinding.test` resolves to 127.0.0.1 the first time it is looked
up in the process (the webhook's check at submission) and to 10.0.0.7, a private
address, every time after (when the delivery connects)."""

import socket

NAME, FIRST, AFTER = "rebinding.test", "127.0.0.1", "10.0.0.7"
_real_getaddrinfo = socket.getaddrinfo
_looked_up = []


def _getaddrinfo(host, port, *args, **kwargs):
    if host != NAME:
        return _real_getaddrinfo(host, port, *args, **kwargs)
    address = AFTER if _looked_up else FIRST
    _looked_up.append(address)
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]


socket.getaddrinfo = _getaddrinfo
