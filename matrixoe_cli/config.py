"""Where the CLI keeps its login: ``<config dir>/matrixoe/login.json``, mode 0600 (it holds a token).

``MATRIXOE_URL`` and ``MATRIXOE_TOKEN`` override what is stored (for CI jobs and cron);
``MATRIXOE_CONFIG_DIR`` moves the directory (tests; several logins side by side).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import typer

FILE_NAME = "login.json"


class NotLoggedIn(Exception):
    pass


@dataclass(frozen=True)
class Login:
    url: str  # the console's base URL, e.g. https://console.example.com
    token: str


def config_dir() -> Path:
    return Path(os.environ.get("MATRIXOE_CONFIG_DIR") or typer.get_app_dir("matrixoe"))


def save_login(login: Login) -> Path:
    """Write the login with mode 0600 (created so, never readable by others even for an instant)."""
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / FILE_NAME
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file may have had looser bits
    with os.fdopen(descriptor, "w") as file:
        json.dump({"url": login.url, "token": login.token}, file)
    return path


def load_login() -> Login:
    """The stored login with the environment's overrides; raises ``NotLoggedIn`` when incomplete."""
    stored: dict[str, str] = {}
    path = config_dir() / FILE_NAME
    if path.exists():
        stored = json.loads(path.read_text())
    url = os.environ.get("MATRIXOE_URL") or stored.get("url", "")
    token = os.environ.get("MATRIXOE_TOKEN") or stored.get("token", "")
    if not url or not token:
        raise NotLoggedIn("Not logged in: run `matrixoe login URL` (or set MATRIXOE_URL and MATRIXOE_TOKEN).")
    return Login(url.rstrip("/"), token)
