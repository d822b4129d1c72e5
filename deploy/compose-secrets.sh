#!/usr/bin/env bash
# Make deploy/secrets/ for compose.yaml: a test CA with the broker's certificate (and one per
# device, in secrets/pki/), the Mosquitto password file (the server's user and one per device), the server's
# broker password and its API token. Run it again to add devices; what exists is kept.
#   deploy/compose-secrets.sh [BROKER_HOSTNAME] [DEVICE_ID ...]
# Prints each new device's password once. Run it as root (sudo) so that the files can be
# given to the containers' users (the broker runs as uid 1883, the server as uid 10001);
# otherwise it says what to chown. For production certificates use your own PKI
# (put its ca.crt, server.crt and server.key in secrets/tls/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/secrets"
host="${1:-localhost}"
[ $# -gt 0 ] && shift
install -d -m 700 "$out"
install -d -m 750 "$out/mosquitto" "$out/tls"
install -d -m 700 "$out/pki"

# the CA (its key stays in pki/, which no container mounts) and the broker's certificate;
# the broker gets only what it needs, in tls/
new=()
for dev in "$@"; do [ -f "$out/pki/$dev.crt" ] || new+=("$dev"); done
if [ ! -f "$out/pki/server.crt" ] || [ ${#new[@]} -gt 0 ]; then
    "$here/tls/make-certs.sh" "$out/pki" "$host" ${new[@]+"${new[@]}"} >/dev/null
fi
install -m 644 "$out/pki/ca.crt" "$out/pki/server.crt" "$out/tls/"
install -m 600 "$out/pki/server.key" "$out/tls/"

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c "$1"; }
[ -s "$out/broker-password" ] || { (umask 077; random 32 > "$out/broker-password"); }
[ -s "$out/api-token" ] || { (umask 077; random 64 > "$out/api-token"); }

# mosquitto_passwd from the host's Mosquitto, else from the broker's image
if ! command -v mosquitto_passwd >/dev/null; then
    shim="$(mktemp -d)"; trap 'rm -rf "$shim"' EXIT
    printf '#!/bin/sh\nexec docker run --rm -v "%s:%s" eclipse-mosquitto:2 mosquitto_passwd "$@"\n' \
        "$out/mosquitto" "$out/mosquitto" > "$shim/mosquitto_passwd"
    chmod +x "$shim/mosquitto_passwd"
    PATH="$shim:$PATH"
fi
passwd="$out/mosquitto/passwd"
"$here/mosquitto/add-user.sh" "$passwd" edge-server "$(cat "$out/broker-password")"
for dev in "$@"; do
    if [ -f "$passwd" ] && grep -q "^$dev:" "$passwd"; then
        echo "$dev: already in the password file (kept)"
    else
        "$here/mosquitto/add-user.sh" "$passwd" "$dev"
    fi
done

if [ "$(id -u)" = 0 ]; then
    chown -R 1883:1883 "$out/mosquitto" "$out/tls"
    chown 10001:10001 "$out/broker-password" "$out/api-token"
else
    echo "not root: before 'docker compose up', give the files to the containers' users:" >&2
    echo "  sudo chown -R 1883:1883 $out/mosquitto $out/tls" >&2
    echo "  sudo chown 10001:10001 $out/broker-password $out/api-token" >&2
fi
echo "secrets in $out (API token: $out/api-token; devices need $out/tls/ca.crt, and for"
echo "mutual TLS their own $out/pki/<device>.crt and .key)"
