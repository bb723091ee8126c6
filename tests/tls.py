"""TLS for tests: throw-away certificates (the `openssl` CLI) and a Kafka that speaks TLS.

Tansu 0.6's own TLS does not work (`--cert` alone answers no handshake,
`--cert` with `--key` is refused; docs/benchmarks.md: "Tests"), so Debian's stunnel
terminates TLS in front of it, asking for a client certificate signed by the
test CA, and Tansu advertises stunnel's address.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from devtools import embedded


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


def stunnel_binary() -> str:
    """Debian's stunnel (`apt-get install stunnel4`; `.ci/run` installs it)."""
    found = shutil.which("stunnel4") or shutil.which("stunnel")
    if not found:
        raise AssertionError("stunnel is not installed: apt-get install stunnel4 (as .ci/run does)")
    return found


def tls_kafka(pki: Pki, workdir: Path, *, authentication: bool = False) -> list[embedded.Server]:
    """Started Tansu (memory store) behind stunnel; returns [tansu, stunnel], the TLS port last.

    With `authentication`, Tansu demands SASL SCRAM-SHA-512 credentials.
    """
    inner, outer = embedded.free_port(), embedded.free_port()
    broker = embedded.kafka_server(inner, str(workdir / "tansu.log"), advertised_port=outer,
                                   authentication=authentication)
    conf = workdir / "stunnel.conf"
    conf.write_text("\n".join([
        "foreground = yes", "pid =", "debug = warning",
        "[kafka]", f"accept = 127.0.0.1:{outer}", f"connect = 127.0.0.1:{inner}",
        f"cert = {pki.dir / 'server.pem'}", f"key = {pki.dir / 'server.key'}",
        f"CAfile = {pki.dir / 'ca.pem'}", "verifyChain = yes", "requireCert = yes", "",
    ]))
    broker.start()
    tunnel = embedded.Server("stunnel", [stunnel_binary(), str(conf)], outer, str(workdir / "stunnel.log"))
    try:
        tunnel.start()
    except Exception:
        broker.stop()
        raise
    return [broker, tunnel]
