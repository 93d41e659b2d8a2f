from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from vms.demo import create_demo_fleet


class Command(BaseCommand):
    help = "Create (idempotently) the demo VSPs, VMs and vPars; agent secrets are shared through files."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--agents-base-port", type=int, default=7101, help="vsp1's agent port; vsp2 +1..."
        )
        parser.add_argument(
            "--secrets-dir",
            type=Path,
            default=Path(settings.BASE_DIR) / "var" / "agent-secrets",
            help="Directory of {vsp}.secret files (read if present, else written with mode 600).",
        )

        parser.add_argument(
            "--pki-dir",
            type=Path,
            help="Directory of the agents' certificates (<vsp>.pem): HTTPS URLs, fingerprints registered.",
        )
        parser.add_argument(
            "--data-plane",
            choices=("required", "off"),
            default="required",
            help="Data-plane encryption policy between the demo hosts (off: a trusted migration network).",
        )

    def handle(
        self,
        *args: Any,
        agents_base_port: int,
        secrets_dir: Path,
        pki_dir: Path | None = None,
        data_plane: str = "required",
        **options: Any,
    ) -> None:
        for line in create_demo_fleet(agents_base_port, secrets_dir, pki_dir, data_plane):
            self.stdout.write(line)
        self.stdout.write(self.style.SUCCESS(f"Demo fleet ready; agent secrets in {secrets_dir}"))
