#!/usr/bin/env bash
# Add (or update) a user in a Mosquitto password file.
#   add-user.sh PASSWD_FILE USERNAME [PASSWORD]
# USERNAME is a device id (letters, digits, '_', '.', '-'; at most 64; not starting with
# "edge-server", the prefix of the server's MQTT client ids) or "edge-server" itself (the
# server's account).
# Without PASSWORD a random one is generated and printed once. Reload Mosquitto afterwards
# (systemctl reload mosquitto, or kill -HUP).
set -euo pipefail
file="${1:?usage: add-user.sh PASSWD_FILE USERNAME [PASSWORD]}"
user="${2?usage: add-user.sh PASSWD_FILE USERNAME [PASSWORD]}"
pass="${3:-}"
if ! [[ "$user" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
    || { [[ "$user" == edge-server* ]] && [ "$user" != edge-server ]; }; then
    echo "add-user.sh: '$user' is not a valid device id (letters, digits, '_', '.', '-';" \
        "at most 64; not starting with 'edge-server', the server's client ids)" >&2
    exit 2
fi
if [ -z "$pass" ]; then
    pass="$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 32)"
    echo "password for $user: $pass"
fi
[ -f "$file" ] || { install -m 600 /dev/null "$file"; }
mosquitto_passwd -b "$file" "$user" "$pass"
