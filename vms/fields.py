"""A model field whose value is encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256).

Keys come from ``settings.SECRETS_ENCRYPTION_KEYS`` (the first encrypts; every one decrypts, so a
key can be rotated: put the new key first, re-save, then drop the old one). In Python the attribute
holds the plain value; the database holds only the token (``gAAAAA...``).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

logger = logging.getLogger(__name__)


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError:
        raise ImproperlyConfigured(
            "SECRETS_ENCRYPTION_KEY must be Fernet keys (32 bytes, URL-safe base64), comma-separated"
        ) from None


def secrets_fernet() -> MultiFernet:
    """The settings' Fernet keys; raises ImproperlyConfigured when one is not a Fernet key."""
    return _fernet(tuple(settings.SECRETS_ENCRYPTION_KEYS))


def encrypt_secret(value: str) -> str:
    """``value`` as a Fernet token (str); an empty value stays empty."""
    return secrets_fernet().encrypt(value.encode()).decode() if value else ""


def decrypt_secret(token: str) -> str:
    """The plain value of ``token``; raises ``cryptography.fernet.InvalidToken`` for a wrong key or value."""
    return secrets_fernet().decrypt(token.encode()).decode() if token else ""


class EncryptedSecretField(models.TextField):
    """Stored as a Fernet token; read back as the plain string.

    A stored value that no configured key decrypts (a changed key) reads as "" and logs an error
    naming the row, never the value: the agent then refuses the console, the VSP shows unreachable,
    and the admin enters the secret again.
    """

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is None:
            return value
        try:
            return decrypt_secret(value)
        except InvalidToken:
            logger.error(
                "A stored %s.%s cannot be decrypted with SECRETS_ENCRYPTION_KEY (was the key changed?)",
                self.model.__name__,
                self.name,
            )
            return ""

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        return value if value is None else encrypt_secret(value)
