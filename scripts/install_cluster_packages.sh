#!/usr/bin/env bash
# Install what `make run-cluster` runs besides the console: Redis and its Sentinel, HAProxy and
# PostgreSQL, from Debian's packages (Debian 12: redis 7.0, haproxy 2.6, postgresql 15). Idempotent:
# installs only what is missing, and starts none of them (the cluster profile starts its own).
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-sentinel >/dev/null || need+=(redis-sentinel)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- "$0" "$@"
fi
if ! command -v apt-get >/dev/null; then
    echo "install_cluster_packages: install ${need[*]} with your distribution's tools." >&2
    exit 1
fi
echo "install_cluster_packages: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
