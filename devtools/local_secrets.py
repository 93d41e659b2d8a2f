"""Secrets of a one-machine console (``make run``, the benchmarks), generated once into ``var/``.

Each secret is a file readable by its owner only (mode 0600), created on first use and reused
after, so sessions, encrypted agent secrets and the Redis password survive restarts. Production
does not use this module: it sets ``SECRET_KEY`` / ``SECRETS_ENCRYPTION_KEY`` / ``REDIS_URL`` (or
their ``*_FILE`` variants) itself. Nothing from Django or the console is imported.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def var_dir() -> Path:
    """``$MATRIXOE_VAR_DIR``, else the project's ``var/``."""
    return Path(os.environ.get("MATRIXOE_VAR_DIR") or BASE_DIR / "var")


def secret_file(path: Path, generate: Callable[[], str]) -> str:
    """The secret kept in ``path``; created with ``generate()`` and mode 0600 when missing or empty.

    An existing file is never rewritten (only its mode is narrowed to 0600), so a secret once
    generated stays. Raises OSError when ``path`` cannot be read or created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        value = path.read_text().strip()
        if value:
            return value
        descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC)
    value = generate()
    with os.fdopen(descriptor, "w") as file:
        file.write(value + "\n")
    os.chmod(path, 0o600)
    return value


def fernet_key() -> str:
    """A new Fernet key: 32 random bytes, URL-safe base64 (the format of ``Fernet.generate_key``)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def token() -> str:
    return secrets.token_urlsafe(50)


def use_local_secrets(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Point ``SECRET_KEY_FILE`` and ``SECRETS_ENCRYPTION_KEY_FILE`` at ``var/`` (created once),
    unless the environment already gives the key or its file."""
    directory = var_dir()
    if not environ.get("SECRET_KEY") and not environ.get("SECRET_KEY_FILE"):
        secret_file(directory / "secret-key", token)
        environ["SECRET_KEY_FILE"] = str(directory / "secret-key")
    if not environ.get("SECRETS_ENCRYPTION_KEY") and not environ.get("SECRETS_ENCRYPTION_KEY_FILE"):
        secret_file(directory / "secrets-encryption.key", fernet_key)
        environ["SECRETS_ENCRYPTION_KEY_FILE"] = str(directory / "secrets-encryption.key")
