#!/usr/bin/env bash
# Make a test certificate authority, a broker certificate and client certificates.
#   make-certs.sh OUTDIR [BROKER_HOSTNAME] [DEVICE_ID ...]
# Writes OUTDIR/ca.{crt,key}, OUTDIR/server.{crt,key} (SAN: BROKER_HOSTNAME, localhost,
# 127.0.0.1) and OUTDIR/<device>.{crt,key} for each DEVICE_ID (CN = device id, for
# Mosquitto's use_identity_as_username). For production, use your own PKI.
# A DEVICE_ID is what add-user.sh takes: letters, digits, '_', '.', '-' (at most 64, not
# starting with '_', '.' or '-'), not "ca" or "server" (those files are the CA's and the
# broker's), and not starting with "edge-server" (with use_username_as_clientid such a device
# would take one of the server's MQTT client ids and disconnect it). Anything else (a '/', '+', '#' or a space would change the ACL's topics) is
# refused before anything is written.
set -euo pipefail
out="${1:?usage: make-certs.sh OUTDIR [BROKER_HOSTNAME] [DEVICE_ID ...]}"
host="${2:-localhost}"
shift $(( $# >= 2 ? 2 : 1 ))
for dev in "$@"; do
    if ! [[ "$dev" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || [ "$dev" = ca ] || [ "$dev" = server ] \
        || [[ "$dev" == edge-server* ]]; then
        echo "make-certs.sh: '$dev' is not a valid device id (letters, digits, '_', '.', '-';" \
            "at most 64; not 'ca' or 'server'; not starting with 'edge-server')" >&2
        exit 2
    fi
done
mkdir -p "$out"
cd "$out"
days=825
if [ ! -f ca.key ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
        -subj "/CN=edge-resume test CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
sign() {  # name cn extfile
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days "$days" -extfile "$3" 2>/dev/null
    rm -f "$1.csr" "$3"
    chmod 600 "$1.key"
}
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$host" > server.ext
sign server "$host" server.ext
for dev in "$@"; do
    printf 'extendedKeyUsage=clientAuth\n' > "$dev.ext"
    sign "$dev" "$dev" "$dev.ext"
done
chmod 600 ca.key
echo "certificates in $out: ca.crt server.crt $(for d in "$@"; do printf '%s.crt ' "$d"; done)"
