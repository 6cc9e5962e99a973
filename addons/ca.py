"""The gateway's certificate authority, and the CA bundle handed to client containers."""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi
from mitmproxy.certs import CertStore

#: mitmproxy's file name prefix for the CA files in its confdir.
CA_BASENAME = "mitmproxy"
CA_KEY_SIZE = 2048


def ca_dir(data_dir: Path) -> Path:
    return data_dir / "ca"


def ensure_ca(data_dir: Path) -> Path:
    """Create the CA on first use and return the path of its public certificate.

    The private key stays in `mitmproxy-ca.pem` (mode 0600); clients get `mitmproxy-ca-cert.pem`.
    """
    directory = ca_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(directory, CA_BASENAME, CA_KEY_SIZE)
    return directory / f"{CA_BASENAME}-ca-cert.pem"


def system_ca_file() -> Path:
    """Return the system's CA bundle, or certifi's when the system has none.

    Clients that read SSL_CERT_FILE replace their whole trust store with it, so a bundle for them
    needs the public CAs as well as the gateway's.
    """
    default = ssl.get_default_verify_paths().cafile
    if default and Path(default).is_file():
        return Path(default)
    return Path(certifi.where())


def write_bundle(data_dir: Path, target: Path) -> Path:
    """Write the system CAs followed by the gateway's CA certificate to `target`."""
    cert = ensure_ca(data_dir)
    system = system_ca_file().read_bytes()
    if not system.endswith(b"\n"):
        system += b"\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(system + cert.read_bytes())
    return target
