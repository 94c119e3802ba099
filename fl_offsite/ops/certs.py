"""TLS certificates and SuperNode keys for Flower's deployment engine.

The model owner makes a CA and the SuperLink's server certificate with :func:`make_certs`
(the SuperLink holds the server certificate and key, everyone else only ``ca.crt``); each
data owner makes an EC P-384 key pair with :func:`make_node_key` and gives the model owner
the public half, which the SuperLink registers (``--enable-supernode-auth``).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from fl_offsite.errors import UserError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


def make_certs(out: str | Path, hosts: Sequence[str], days: int = 365, overwrite: bool = False) -> Path:
    """Write a CA (``ca.crt``, ``ca.key``) and a server certificate for ``hosts`` (``server.pem``,
    ``server.key``) signed by it into ``out``; return ``out``.

    ``hosts`` are the names and IP addresses the SuperNodes and ``flwr`` use to reach the
    SuperLink: each becomes a subject alternative name (TLS checks the address against them).
    127.0.0.1 is always added: a SuperLink bound to every interface has its own SuperExec
    (which starts the ServerApp) connect to it there, over TLS.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise UserError("give at least one host name or IP address the SuperLink is reached at (--host)")
    out = Path(out).expanduser()
    if (out / CA_KEY).exists() and not overwrite:
        raise UserError(f"{out / CA_KEY} exists: certificates were made already (pass --overwrite to replace them; "
                        "every SuperNode then needs the new ca.crt)")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    names = [_san(h) for h in dict.fromkeys([*hosts, "127.0.0.1"])]

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-offsite CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))

    _write_private(out / CA_KEY, _pem_key(ca_key))
    _write_private(out / SERVER_KEY, _pem_key(server_key))
    from cryptography.hazmat.primitives.serialization import Encoding
    (out / CA_CERT).write_bytes(ca_cert.public_bytes(Encoding.PEM))
    (out / SERVER_CERT).write_bytes(server_cert.public_bytes(Encoding.PEM))
    return out


def make_node_key(out: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A data owner's SuperNode key pair: ``out/NAME`` (private, OpenSSH format, stays on the node)
    and ``out/NAME.pub`` (the public key the model owner registers). Same as
    ``ssh-keygen -t ecdsa -b 384 -N '' -f out/NAME``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"node key name {name!r}: use letters, digits, '.', '_' and '-' only")
    out = Path(out).expanduser()
    private, public = out / name, out / f"{name}.pub"
    if private.exists() and not overwrite:
        raise UserError(f"{private} exists (pass --overwrite to replace it; the model owner must then "
                        "register the new public key)")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def server_names(certs: str | Path) -> list[str]:
    """The host names and IP addresses the SuperLink's certificate is valid for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((Path(certs) / SERVER_CERT).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]
