"""Creating, checking and revoking personal API tokens.

Format: ``moe_`` + 43 URL-safe characters (32 random bytes, ``secrets.token_urlsafe``). Stored as the
SHA-256 hex digest only; the plain token exists once, in the answer to its creation.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.utils import timezone

from .models import NAME_MAX_LENGTH, ApiToken

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "moe_"  # noqa: S105 - a marker, not a secret
# last_used_at is written at most this often per token, so reads do not all turn into writes.
LAST_USED_RESOLUTION = timedelta(seconds=30)


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def do_create_token(user: Any, name: str) -> tuple[ApiToken, str]:
    """A new active token for ``user``; returns (the stored row, the plain token to show once).

    Raises ``ValidationError`` for an empty or too long name.
    """
    name = (name or "").strip()
    if not name:
        raise ValidationError("Give the token a name, e.g. what or where it is used.")
    if len(name) > NAME_MAX_LENGTH:
        raise ValidationError(f"The name is too long: at most {NAME_MAX_LENGTH} characters.")
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name, prefix=plain[:10], digest=digest_of(plain))
    logger.info("%s created API token %s (%s…)", user, token.pk, token.prefix)
    return token, plain


def do_revoke_token(user: Any, token_id: int) -> ApiToken:
    """Revoke one of ``user``'s own tokens. Raises ``ApiToken.DoesNotExist`` for anyone else's."""
    token = ApiToken.objects.get(pk=token_id, user=user)
    ApiToken.objects.filter(pk=token.pk, revoked_at=None).update(revoked_at=timezone.now())
    logger.info("%s revoked API token %s (%s…)", user, token.pk, token.prefix)
    token.refresh_from_db()
    return token


def user_for_token(plain: str) -> Any | None:
    """The active user owning this active token, or None; records the token's last use."""
    if not plain or not plain.startswith(TOKEN_PREFIX) or len(plain) > 100:
        return None
    token = ApiToken.objects.select_related("user").filter(digest=digest_of(plain), revoked_at=None).first()
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user
