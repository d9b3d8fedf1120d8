"""Tests of natsrpc.auth: server lists, redaction, security options, TLS contexts, and the shared flags/env."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest

import natsrpc
from natsrpc import auth, cli, run


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    """A file standing in for an NKey seed or creds file (only its existence is checked here)."""
    path = tmp_path / "user.nk"
    path.write_text("SUAEXAMPLE\n")
    return path


class TestSplitServers:
    """Server URLs come as one string, a comma-separated string, or a list."""

    @pytest.mark.parametrize(
        ("servers", "expected"),
        [
            ("nats://a:4222", ["nats://a:4222"]),
            ("nats://a:4222, nats://b:4222,", ["nats://a:4222", "nats://b:4222"]),
            (["nats://a:4222", "nats://b:4222,nats://c:4222"], ["nats://a:4222", "nats://b:4222", "nats://c:4222"]),
        ],
        ids=["one", "comma-separated", "list"],
    )
    def test_split(self, servers: str | list[str], expected: list[str]) -> None:
        """Whitespace and empty items are dropped; the order stays."""
        assert auth.split_servers(servers) == expected

    def test_empty_is_an_error(self) -> None:
        """No URL at all raises ConfigurationError."""
        with pytest.raises(natsrpc.ConfigurationError):
            auth.split_servers(" , ")


class TestRedacted:
    """Server URLs in messages and logs never show passwords or tokens."""

    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("nats://h:4222", "nats://h:4222"),
            ("nats://app:s3cret@h:4222", "nats://app:***@h:4222"),
            ("tls://tok3n@h:4222", "tls://***@h:4222"),
            ("h:4222", "h:4222"),
        ],
        ids=["plain", "password", "token", "no-scheme"],
    )
    def test_masks_secrets(self, url: str, shown: str) -> None:
        """user:password keeps the user; a bare token is masked whole."""
        assert auth.redacted([url]) == shown


class TestNatsOptions:
    """natsrpc's security keywords become nats-py options, checked before any connection."""

    def test_unset_options_are_left_out(self) -> None:
        """With nothing set, nats-py's own defaults apply."""
        assert auth.nats_options() == {}

    def test_mapping(self, seed: Path) -> None:
        """user/password/token/inbox_prefix pass through; creds becomes user_credentials."""
        options = auth.nats_options(user="app", password="pw", token="t", creds=str(seed), inbox_prefix="_INBOX_app")
        assert options == {
            "user": "app",
            "password": "pw",
            "token": "t",
            "user_credentials": str(seed),
            "inbox_prefix": "_INBOX_app",
        }
        assert auth.nats_options(nkeys_seed=str(seed)) == {"nkeys_seed": str(seed)}

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"creds": "/no/such.creds"}, "no such file"),
            ({"tls_ca": "/no/such-ca.pem"}, "no such file"),
            ({"password": "pw"}, "password needs user"),
            ({"inbox_prefix": "_INBOX.>"}, "not a subject prefix"),
            ({"inbox_prefix": "_INBOX_app."}, "not a subject prefix"),
            ({"inbox_prefix": ""}, "not a subject prefix"),
        ],
        ids=["missing-creds", "missing-ca", "password-without-user", "wildcard-prefix", "trailing-dot", "empty-prefix"],
    )
    def test_refused(self, options: dict[str, str], message: str) -> None:
        """Unusable options raise ConfigurationError naming the problem."""
        with pytest.raises(natsrpc.ConfigurationError, match=message):
            auth.nats_options(**options)

    def test_seed_and_creds_together(self, seed: Path) -> None:
        """A creds file holds its own seed: giving both is an error."""
        with pytest.raises(natsrpc.ConfigurationError, match="not both"):
            auth.nats_options(nkeys_seed=str(seed), creds=str(seed))

    def test_tls_files_make_a_context(self, tmp_path: Path) -> None:
        """An unreadable CA file is a ConfigurationError; a key without a certificate too."""
        bogus = tmp_path / "ca.pem"
        bogus.write_text("not a certificate")
        with pytest.raises(natsrpc.ConfigurationError, match="cannot load TLS files"):
            auth.nats_options(tls_ca=str(bogus))
        with pytest.raises(natsrpc.ConfigurationError, match="tls_key needs tls_cert"):
            auth.tls_context(key=str(bogus))

    def test_system_cas_by_default(self) -> None:
        """Without a CA file the context verifies the server against the system CAs, hostname included."""
        context = auth.tls_context()
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname


class TestConnectOptions:
    """connect() takes the security keywords and refuses contradictions before connecting."""

    def test_tls_twice(self) -> None:
        """An SSLContext and tls_* files together are ambiguous."""
        with pytest.raises(natsrpc.ConfigurationError, match="not both"):
            natsrpc.connect("nats://127.0.0.1:1", tls=ssl.create_default_context(), tls_cert=__file__)

    async def test_comma_separated_servers(self, nats_url: str) -> None:
        """A comma-separated string connects like a list (a dead URL first: the pool moves on)."""
        async with natsrpc.connect(f"{nats_url},{nats_url}") as client:
            assert client.nc.is_connected
            assert len(client.nc.servers) >= 2

    async def test_inbox_prefix_used_for_replies(self, nats_url: str) -> None:
        """The client's reply subscription lives under inbox_prefix."""
        async with natsrpc.connect(nats_url, inbox_prefix="_INBOX_app") as client:
            assert client._reply_sub.subject.startswith("_INBOX_app.")


class TestFlags:
    """The runner and the CLI share the security flags, each defaulting to its environment variable."""

    @pytest.mark.parametrize("make_parser", [run.parser, cli.parser], ids=["run", "cli"])
    def test_every_option_has_its_flag(self, make_parser: object) -> None:
        """Both parsers accept every flag of auth.OPTIONS."""
        assert callable(make_parser)
        parser: argparse.ArgumentParser = make_parser()
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {option.flag for option in auth.OPTIONS} <= flags

    def test_env_then_flags(self, monkeypatch: pytest.MonkeyPatch, seed: Path) -> None:
        """Environment variables fill unset flags; a flag wins over its variable; unset ones are left out."""
        monkeypatch.setenv("NATS_USER", "from-env")
        monkeypatch.setenv("NATS_PASSWORD", "pw-from-env")
        monkeypatch.setenv("NATS_CREDS", str(seed))
        monkeypatch.delenv("NATS_TOKEN", raising=False)
        args = run.parser().parse_args(["services.kv", "--user", "from-flag", "--inbox-prefix", "_INBOX_kv"])
        assert auth.from_args(args) == {
            "user": "from-flag",
            "password": "pw-from-env",
            "creds": str(seed),
            "inbox_prefix": "_INBOX_kv",
        }

    def test_cli_missing_file_is_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """python -m natsrpc with a creds file that does not exist exits 2 with the reason."""
        assert cli.main(["--url", "nats://127.0.0.1:1", "--creds", "/no/such.creds", "ls"]) == 2
        assert "no such file" in capsys.readouterr().err

    def test_help_names_the_variables(self) -> None:
        """--help lists each flag with its environment variable."""
        text = run.parser().format_help()
        for option in auth.OPTIONS:
            assert option.flag in text
            assert option.env in text
