"""Throw-away certificate authorities and certificates for TLS tests, made with the `openssl` CLI."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client
    certificate it signed, and a second CA ("rogue") with its own client certificate."""

    dir: Path

    def text(self, name: str) -> str:
        """The PEM text of `<name>.pem` (certificate) or `<name>.key`."""
        return (self.dir / name).read_text()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=herald test {name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd)


def _signed(name: str, ca: str, cn: str, cwd: Path, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=cwd)
    extra = []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", *extra, cwd=cwd)


def make_pki(directory: Path) -> Pki:
    """Create the CAs and certificates in `directory` (RSA 2048, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", directory)
    _ca("rogue-ca", directory)
    _signed("server", "ca", "127.0.0.1", directory, "IP:127.0.0.1,DNS:localhost")
    _signed("client", "ca", "herald", directory)
    _signed("rogue-client", "rogue-ca", "herald", directory)
    return Pki(directory)
