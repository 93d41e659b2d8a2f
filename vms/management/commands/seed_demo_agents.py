from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from vms.demo import seed_demo_agents
from vms.inventory import collect_all_inventory


class Command(BaseCommand):
    help = "Define the demo fleet's guests on the running demo host agents, then collect their state."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--driver", choices=("simulated", "qemu"), default="simulated")
        parser.add_argument("--pool-dir", type=Path, help="the demo's shared pool directory (its agents')")

    def handle(self, *args: Any, driver: str, pool_dir: Path | None = None, **options: Any) -> None:
        for line in seed_demo_agents(driver, pool_dir):
            self.stdout.write(line)
        answered = collect_all_inventory()
        self.stdout.write(self.style.SUCCESS(f"Agents answering: {sum(answered.values())}/{len(answered)}"))
