#!/bin/sh
# Written by rbee-keeper for hive {{ alias }}; the next deploy overwrites it.
# start | stop | status of this host's hive, supervised by {{ mode }}.
# Without systemd the hive runs detached (setsid) with a pidfile, and a pid counts as the hive only
# when its command line says so: a stale pidfile never makes us signal someone else's process.
# The hive retitles itself "rbee-hive --home INSTALL ..." (what ps shows); before that, and in the
# instant between exec and retitling, it is "python -m rbee_fleet.hive --home INSTALL ..." or the run script.
INSTALL={{ install_dir | q }}
PIDFILE="$INSTALL/run/hive.pid"
LOG="$INSTALL/logs/hive.log"
UNIT={{ unit_name | q }}
MODE={{ mode | q }}
{% if mode == "systemd-user" %}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}"
SYSTEMCTL="systemctl --user"
{% else %}
SYSTEMCTL="systemctl"
{% endif %}

is_hive() {
    [ -r "/proc/$1/cmdline" ] || return 1
    cmd=$(tr '\0' ' ' < "/proc/$1/cmdline")
    case "$cmd" in
        "rbee-hive --home $INSTALL "*) return 0 ;;
        *"-m rbee_fleet.hive --home $INSTALL "*) return 0 ;;
        *"$INSTALL/bin/rbee-hive-run"*) return 0 ;;
    esac
    return 1
}

hive_pid() {
    if [ "$MODE" = pidfile ]; then
        [ -f "$PIDFILE" ] || return 1
        pid=$(cat "$PIDFILE" 2>/dev/null)
    else
        $SYSTEMCTL is-active --quiet "$UNIT" || return 1
        pid=$($SYSTEMCTL show -p MainPID --value "$UNIT")
    fi
    case "$pid" in ''|0|*[!0-9]*) return 1 ;; esac
    is_hive "$pid" && echo "$pid"
}

case "$1" in
start)
    if pid=$(hive_pid); then echo "running $pid"; exit 0; fi
    mkdir -p "$INSTALL/logs" "$INSTALL/run"
    if [ "$MODE" = pidfile ]; then
        # Detach all three standard streams, or the SSH channel that started us never closes.
        setsid "$INSTALL/bin/rbee-hive-run" </dev/null >>"$LOG" 2>&1 &
        echo $! > "$PIDFILE.tmp" && mv "$PIDFILE.tmp" "$PIDFILE"
        echo "started $!"
    else
{% if mode == "systemd-user" %}
        # Lingering keeps the user's units running after the SSH session ends (and starts them at boot).
        loginctl enable-linger "$(id -un)" 2>/dev/null || echo "warning: loginctl enable-linger failed" >&2
{% endif %}
        $SYSTEMCTL daemon-reload && $SYSTEMCTL enable --now "$UNIT" >/dev/null 2>&1 || exit 1
        echo "started $(hive_pid)"
    fi
    ;;
stop)
    if [ "$MODE" != pidfile ]; then
        $SYSTEMCTL stop "$UNIT" 2>/dev/null
    elif pid=$(hive_pid); then
        kill -TERM "$pid" 2>/dev/null
        i=0
        while is_hive "$pid" && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        if is_hive "$pid"; then kill -KILL "$pid" 2>/dev/null; fi
    fi
    rm -f "$PIDFILE"
    echo stopped
    ;;
status)
    if pid=$(hive_pid); then echo "running $pid"; else echo stopped; exit 3; fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
