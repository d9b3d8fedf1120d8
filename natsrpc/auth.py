"""Connection security: credentials, TLS files and the reply-inbox prefix, from keywords, flags or env.

One table, :data:`OPTIONS`, names each option once; :func:`natsrpc.connect` turns the keywords into
nats-py options with :func:`nats_options`, and the runner and the CLI get the same flags and
environment variables from :func:`add_arguments` and :func:`from_args`.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natsrpc.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Option:
    """One security option: its ``connect()`` keyword, command-line flag, environment variable and help."""

    keyword: str
    flag: str
    env: str
    help: str
    is_file: bool = False
    secret: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("user", "--user", "NATS_USER", "user name"),
    Option("password", "--password", "NATS_PASSWORD", "password", secret=True),
    Option("token", "--token", "NATS_TOKEN", "authentication token", secret=True),
    Option("nkeys_seed", "--nkey-seed", "NATS_NKEY_SEED", "file holding an NKey seed (SU...)", is_file=True),
    Option("creds", "--creds", "NATS_CREDS", "user credentials file (JWT and NKey seed)", is_file=True),
    Option("tls_ca", "--tls-ca", "NATS_TLS_CA", "CA certificate(s) that sign the server's certificate", is_file=True),
    Option("tls_cert", "--tls-cert", "NATS_TLS_CERT", "client certificate for mutual TLS", is_file=True),
    Option("tls_key", "--tls-key", "NATS_TLS_KEY", "private key of the client certificate", is_file=True),
    Option(
        "inbox_prefix",
        "--inbox-prefix",
        "NATS_INBOX_PREFIX",
        "prefix of this connection's reply subjects (e.g. _INBOX_app), to match its subscribe permission",
    ),
)
"""Every security option, in the order the help lists them."""


def split_servers(servers: str | Sequence[str]) -> list[str]:
    """Returns the server URLs of ``"nats://a:4222,nats://b:4222"`` or of a list (items may hold commas too).

    Raises:
        ConfigurationError: no URL given.
    """
    items = [servers] if isinstance(servers, str) else list(servers)
    urls = [url.strip() for item in items for url in item.split(",") if url.strip()]
    if not urls:
        raise ConfigurationError("no NATS server URL given")
    return urls


def redacted(servers: Sequence[str]) -> str:
    """Returns ``servers`` for messages and logs, comma-separated, with passwords and tokens in URLs masked."""
    shown = []
    for url in servers:
        scheme, sep, rest = url.rpartition("://")
        userinfo, at, host = rest.rpartition("@")
        if at:  # user:password, or a bare token
            userinfo = userinfo.split(":", 1)[0] + ":***" if ":" in userinfo else "***"
        shown.append(f"{scheme}{sep}{userinfo}{at}{host}")
    return ",".join(shown)


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Returns a client SSLContext that verifies the server (against ``ca``, else the system CAs).

    With ``cert`` (and ``key``, unless the certificate file holds the key too) the client presents
    its own certificate: mutual TLS.

    Raises:
        ConfigurationError: a file is missing or unreadable, or ``key`` is given without ``cert``.
    """
    if key and not cert:
        raise ConfigurationError("tls_key needs tls_cert: a private key alone cannot authenticate")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS files (ca={ca}, cert={cert}, key={key}): {exc}") from exc
    return context


def nats_options(
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    nkeys_seed: str | None = None,
    creds: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    inbox_prefix: str | None = None,
) -> dict[str, Any]:
    """Returns the ``nats.connect`` keyword arguments for natsrpc's security options (unset ones left out).

    Args:
        user: user name (with ``password``).
        password: password.
        token: authentication token.
        nkeys_seed: path of a file holding an NKey seed.
        creds: path of a user credentials file (JWT and seed), as ``nsc`` writes it.
        tls_ca: CA file to verify the server with; any ``tls_*`` option turns TLS on.
        tls_cert: client certificate file (mutual TLS).
        tls_key: the client certificate's private key file.
        inbox_prefix: prefix of the reply subjects (default ``_INBOX``); give each identity its own.

    Raises:
        ConfigurationError: a named file does not exist, or the options contradict each other.
    """
    files = {"nkeys_seed": nkeys_seed, "creds": creds, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ConfigurationError(f"{name}: no such file {path!r}")
    if nkeys_seed and creds:
        raise ConfigurationError("give nkeys_seed or creds, not both (a creds file holds its own seed)")
    if password is not None and user is None:
        raise ConfigurationError("password needs user")
    if password == "" or token == "":
        raise ConfigurationError("an empty password or token is refused: set a real secret, or leave the option out")
    options: dict[str, Any] = {}
    if user is not None:
        options["user"] = user
    if password is not None:
        options["password"] = password
    if token is not None:
        options["token"] = token
    if nkeys_seed is not None:
        options["nkeys_seed"] = nkeys_seed
    if creds is not None:
        options["user_credentials"] = creds
    if tls_ca or tls_cert or tls_key:
        options["tls"] = tls_context(tls_ca, tls_cert, tls_key)
    if inbox_prefix is not None:
        if not inbox_prefix or any(c in inbox_prefix for c in " \t\r\n*>") or inbox_prefix.endswith("."):
            raise ConfigurationError(f"inbox_prefix {inbox_prefix!r} is not a subject prefix (e.g. _INBOX_app)")
        options["inbox_prefix"] = inbox_prefix
    return options


def add_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None, *, repeated: bool = False
) -> None:
    """Adds the security flags to ``parser``, each defaulting to its environment variable.

    With ``repeated`` (a subcommand's copy of the flags, so they work after it too) they have no
    default: the main parser's value stands unless the flag is given after the subcommand.
    """
    env = os.environ if environ is None else environ
    group = parser.add_argument_group("security", "credentials, TLS and reply subjects (flags override env)")
    for option in OPTIONS:
        group.add_argument(
            option.flag,
            dest=option.keyword,
            default=argparse.SUPPRESS if repeated else env.get(option.env) or None,
            metavar="FILE" if option.is_file else option.keyword.split("_")[-1].upper(),
            help=f"{option.help} (env {option.env}{'; prefer it: ps shows flags' if option.secret else ''})",
        )


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Returns the :func:`natsrpc.connect` keywords set by flags or env in parsed ``args``."""
    return {o.keyword: getattr(args, o.keyword) for o in OPTIONS if getattr(args, o.keyword, None) is not None}
