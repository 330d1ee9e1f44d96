#!/bin/sh
# Written by rbee-keeper for hive {{ alias }}; the next deploy overwrites it.
# Starts this host's hive from the version `current` points to, in the foreground.
INSTALL={{ install_dir | q }}
VERSION_DIR=$(readlink -f "$INSTALL/current") || { echo "rbee-hive: $INSTALL/current is missing" >&2; exit 1; }
cd "$INSTALL" || exit 1
exec "$VERSION_DIR/venv/bin/python" -m rbee_fleet.hive \
    --home "$INSTALL" \
    --hive-id {{ alias | q }} \
    --host {{ bind_host | q }} \
    --port {{ port }} \
    --advertise-host {{ address | q }} \
    --queen-url {{ queen_url | q }} \
    --token-file "$INSTALL/secrets/cluster.token" \
    --worker-port-base {{ worker_port_base }} \
    --heartbeat-interval {{ heartbeat_interval_s }}
