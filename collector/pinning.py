"""An HTTP client that trusts exactly one server certificate, named by its SHA-256
fingerprint (as ``kubeadm join --discovery-token-ca-cert-hash`` does), instead of a CA chain.
The agent's shipper, ``sshaudit-agent enroll`` and the auditor CLI use it.

Invariants:
- the fingerprint (collector/tls.py: SHA-256 over the certificate's DER) is checked by
  urllib3 right after the TLS handshake, before a single byte of the request (and so its
  bearer token) is sent; a mismatch raises :class:`requests.exceptions.SSLError`;
- no CA bundle, hostname or expiry check applies: the pin alone is the trust anchor, so a
  self-signed collector certificate works and an attacker's CA-signed one does not;
- plain ``http://`` URLs are refused unless ``allow_http`` (loopback tests), so a token can
  never leave in clear by a configuration slip; environment proxies and ``.netrc`` are
  ignored (``trust_env`` off): the collector is reached directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from sshaudit.collector.tls import parse_fingerprint


class PinnedAdapter(HTTPAdapter):
    """A :class:`requests.adapters.HTTPAdapter` for ``https://`` that checks a pin."""

    def __init__(self, fingerprint: str, **kwargs: Any) -> None:
        self.fingerprint = parse_fingerprint(fingerprint)
        super().__init__(**kwargs)

    def _pin(self, pool_kwargs: dict[str, Any]) -> dict[str, Any]:
        for name in ("ca_certs", "ca_cert_dir", "ca_cert_data"):
            pool_kwargs.pop(name, None)
        pool_kwargs["cert_reqs"] = "CERT_NONE"  # the chain is not what we trust ...
        pool_kwargs["assert_fingerprint"] = self.fingerprint  # ... this digest is
        return pool_kwargs

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **self._pin(pool_kwargs))

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # Through a proxy (HTTP CONNECT) the TLS session is still ours: pin it too.
        return super().proxy_manager_for(proxy, **self._pin(proxy_kwargs))

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        # requests would otherwise put CERT_REQUIRED and a CA bundle on the connection
        # pool for this request; with verify=False it keeps the pool manager's settings
        # above, where the fingerprint is the one check.
        return super().send(request, stream, timeout, False, cert, proxies)


class _RefuseHttp(HTTPAdapter):
    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise requests.exceptions.InvalidSchema(
            f"refusing plain HTTP to {request.url}: the collector is reached over TLS"
        )


def pinned_session(fingerprint: str, *, allow_http: bool = False) -> requests.Session:
    """A :class:`requests.Session` whose ``https://`` requests trust only ``fingerprint``."""
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", PinnedAdapter(fingerprint))
    if not allow_http:
        session.mount("http://", _RefuseHttp())
    return session
