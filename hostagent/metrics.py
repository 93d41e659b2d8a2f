"""The agent's own Prometheus metrics (``GET /metrics``, behind the agent's secret like every route).

Computed at scrape time from what the agent already holds (its driver's guests and the migrations it
serves), so nothing is counted twice and nothing needs resetting. Names start with ``matrixoe_agent_``;
the console's own metrics (``/metrics`` of the web server, ``api/metrics.py``) start with ``matrixoe_``.

Exported (all gauges; bytes in bytes, memory in MiB):
- ``matrixoe_agent_info{name,version,driver}`` 1
- ``matrixoe_agent_guests{hardware_status}``: guests defined on this host by hardware status
- ``matrixoe_agent_guest_memory_mib{hardware_status}``: their memory, summed
- ``matrixoe_agent_migrations{role,state}``: migrations this agent serves, by side and state
- ``matrixoe_agent_migration_bytes_sent{migration_id,role}``, ``..._bytes_remaining``,
  ``..._dirty_rate_bytes_per_second``, ``..._round``: per active migration
- ``matrixoe_agent_pool_capacity_bytes{pool,kind}``, ``matrixoe_agent_pool_free_bytes{pool,kind}``: each
  storage pool now (``statvfs``); ``matrixoe_agent_volume_writers{pool}``: volumes held open for writing
- the process's own CPU, resident memory and open files (``process_*``, prometheus-client's
  ``ProcessCollector``)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentprotocol import ACTIVE_STATES
from hostagent import __version__
from hostagent.driver import Driver, Migration

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector(Collector):
    """Reads the driver and the migrations table at every scrape (no state of its own)."""

    def __init__(self, name: str, driver: Driver, migrations: Callable[[], Mapping[str, Migration]]) -> None:
        self.name, self.driver, self.migrations = name, driver, migrations

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "matrixoe_agent_info", "This host agent", labels=["name", "version", "driver"]
        )
        info.add_metric([self.name, __version__, self.driver.name], 1)
        yield info
        yield from self._guests()
        yield from self._pools()
        yield from self._migrations(list(self.migrations().values()))

    def _pools(self) -> Iterable[GaugeMetricFamily]:
        resources = self.driver.resources()
        labels = ["pool", "kind"]
        capacity = GaugeMetricFamily(
            "matrixoe_agent_pool_capacity_bytes", "Storage pool size (bytes)", labels=labels
        )
        free = GaugeMetricFamily("matrixoe_agent_pool_free_bytes", "Storage pool free bytes", labels=labels)
        writers = GaugeMetricFamily(
            "matrixoe_agent_volume_writers", "Volumes held open for writing", labels=["pool"]
        )
        written = Counter(writer.pool_identity for writer in resources.writers)
        for pool in resources.pools:
            capacity.add_metric([pool.name, pool.kind], pool.capacity_bytes)
            free.add_metric([pool.name, pool.kind], pool.free_bytes)
            writers.add_metric([pool.name], written[pool.identity])
        return (capacity, free, writers)

    def _guests(self) -> Iterable[GaugeMetricFamily]:
        count = GaugeMetricFamily("matrixoe_agent_guests", "Guests on this host", labels=["hardware_status"])
        memory = GaugeMetricFamily(
            "matrixoe_agent_guest_memory_mib", "Guest memory on this host (MiB)", labels=["hardware_status"]
        )
        guests, mib = Counter[str](), Counter[str]()
        for guest in self.driver.list_guests():
            guests[guest.hardware_status] += 1
            mib[guest.hardware_status] += guest.memory_mib
        for status in ("on", "off", "not_runnable"):
            count.add_metric([status], guests[status])
            memory.add_metric([status], mib[status])
        return (count, memory)

    def _migrations(self, migrations: list[Migration]) -> Iterable[GaugeMetricFamily]:
        states = GaugeMetricFamily(
            "matrixoe_agent_migrations", "Migrations this agent serves", labels=["role", "state"]
        )
        per_migration = {
            field: GaugeMetricFamily(
                f"matrixoe_agent_migration_{metric}", help_text, labels=["migration_id", "role"]
            )
            for field, metric, help_text in (
                ("bytes_sent", "bytes_sent", "Bytes sent so far"),
                ("bytes_remaining", "bytes_remaining", "Bytes left to send"),
                ("dirty_rate_bytes_s", "dirty_rate_bytes_per_second", "Measured dirty rate (bytes/s)"),
                ("round", "round", "Pre-copy round"),
            )
        }
        counted = Counter[tuple[str, str]]()
        for migration in migrations:
            snapshot = migration.snapshot()
            counted[(migration.role, snapshot.state)] += 1
            if snapshot.state in ACTIVE_STATES:
                for field, family in per_migration.items():
                    family.add_metric([migration.migration_id, migration.role], getattr(snapshot, field))
        for (role, state), number in sorted(counted.items()):
            states.add_metric([role, state], number)
        return (states, *per_migration.values())


def agent_registry(
    name: str, driver: Driver, migrations: Callable[[], Mapping[str, Migration]]
) -> CollectorRegistry:
    """A registry of this agent's metrics and its process's (one per agent app, not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(name, driver, migrations))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
