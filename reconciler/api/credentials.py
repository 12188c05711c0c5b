"""Access keys, found the way Volcengine's own SDK finds them.

``VOLC_ACCESSKEY`` / ``VOLC_SECRETKEY`` (and optional ``VOLC_SESSION_TOKEN``)
from the environment win; otherwise ``~/.volc/credentials``, an INI file whose
``[default]`` section holds ``access_key_id`` and ``secret_access_key``.

The secret key and session token are kept out of ``repr`` and ``str`` so that a
credentials object that ends up in a log line, a traceback or an exception
message shows the access key id only.

The file holds the secret key, so like ssh with a private key,
:func:`too_open` says when its permissions let anyone but its owner in (any
group or other bit, as ssh's ``0077`` check); the CLI warns, and ``run``
refuses to start unless told otherwise.
"""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class CredentialsError(Exception):
    """No usable credentials; raised before any call is made."""


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: The file they were read from; ``None``: the environment.
    source: Path | None = field(default=None, compare=False)


def default_credentials_file() -> Path:
    return Path.home() / ".volc" / "credentials"


def too_open(path: Path) -> str | None:
    """Why the credentials file at ``path`` is readable by others, as ssh says it of a
    private key (``None``: only its owner has access, or it cannot be looked at)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    who = "everyone" if mode & 0o007 else "its group"
    return (
        f"permissions {mode:04o} for {path} are too open: it holds the secret key and "
        f"{who} may read it (run: chmod 600 {path})"
    )


def load_credentials(
    *, environ: Mapping[str, str] | None = None, path: Path | None = None
) -> Credentials:
    """Credentials from the environment, else the SDK's INI file.

    Raises :class:`CredentialsError` naming what is missing and where it looked.
    """
    env = os.environ if environ is None else environ
    ak, sk = env.get("VOLC_ACCESSKEY", ""), env.get("VOLC_SECRETKEY", "")
    token = env.get("VOLC_SESSION_TOKEN") or None
    if ak and sk:
        return Credentials(ak, sk, token)
    if ak or sk:
        missing = "VOLC_SECRETKEY" if ak else "VOLC_ACCESSKEY"
        raise CredentialsError(f"{missing} is not set (the other half of the key pair is)")
    ini = path or default_credentials_file()
    if not ini.is_file():
        raise CredentialsError(
            f"no credentials: set VOLC_ACCESSKEY and VOLC_SECRETKEY, or write {ini} "
            "with a [default] section holding access_key_id and secret_access_key"
        )
    parser = configparser.ConfigParser()
    try:
        parser.read(ini, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(
            f"{ini}: cannot read credentials file: {type(exc).__name__}"
        ) from None
    section = parser["default"] if parser.has_section("default") else None
    ak = section.get("access_key_id", "").strip() if section else ""
    sk = section.get("secret_access_key", "").strip() if section else ""
    token = (section.get("session_token", "").strip() or None) if section else None
    if not (ak and sk):
        raise CredentialsError(
            f"{ini}: [default] section needs both access_key_id and secret_access_key"
        )
    return Credentials(ak, sk, token, source=ini)
