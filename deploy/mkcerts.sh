#!/usr/bin/env bash
# Make a test CA, a broker certificate and a client certificate with openssl.
# See --help.
set -euo pipefail
# Byte-wise character ranges in the name checks, whatever the user's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/mkcerts.sh [--days N] DIR [HOSTNAME...]

Writes into DIR/certs/:
  ca.crt, ca.key          a self-signed test CA (kept if it exists)
  server.crt, server.key  the broker's certificate, signed by the CA, valid for
                          localhost, 127.0.0.1, ::1 and every HOSTNAME given
                          (a name or an IP address)
  client.crt, client.key  a client certificate (CN cellwatch-client), for
                          brokers that ask for one

Re-running keeps the CA and keeps the certificates that are still valid, signed
by that CA and (server) name the same hosts; others are made again. Keys are
EC P-256. This is for tests and small installations: a production broker
should use certificates from the organisation's CA (same file names).

  --days N   validity of new certificates in days (default: 825)
EOF
}

die() {
    echo "mkcerts.sh: $*" >&2
    exit 1
}

days=825
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --days)
            [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--days needs a positive number"
            days=$2
            shift 2
            ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
command -v openssl >/dev/null || die "openssl not found: apt-get install openssl"

dir=$1
shift
certs=$dir/certs

# Subject Alternative Names of the server certificate.
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    if [[ $host =~ ^[0-9]+(\.[0-9]+){3}$ || $host == *:* ]]; then
        san+=",IP:$host"
    elif [[ $host =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        san+=",DNS:$host"
    else
        die "invalid host name '$host'"
    fi
done

mkdir -p "$certs"
umask 077
work=$(mktemp -d "$certs/.mkcerts.XXXXXX")
trap 'rm -rf "$work"' EXIT

newkey() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null \
        || die "openssl could not make a key"
}

# --- CA ----------------------------------------------------------------------
if [[ -f $certs/ca.crt && -f $certs/ca.key ]]; then
    echo "mkcerts.sh: keeping the CA in $certs/ca.crt"
else
    [[ ! -f $certs/ca.crt && ! -f $certs/ca.key ]] \
        || die "$certs has only one of ca.crt and ca.key; remove it or add the other"
    newkey "$work/ca.key"
    cat >"$work/ca.ext" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = cellwatch test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl req -new -x509 -config "$work/ca.ext" -key "$work/ca.key" -days "$days" \
        -sha256 -out "$work/ca.crt" 2>/dev/null || die "openssl could not make the CA"
    mv "$work/ca.key" "$certs/ca.key"
    mv "$work/ca.crt" "$certs/ca.crt"
    # Leaf certificates of an older CA are no longer valid.
    rm -f "$certs/server.crt" "$certs/client.crt"
    echo "mkcerts.sh: made a new CA $certs/ca.crt"
fi

# is_current NAME WANT_SAN: NAME.crt and NAME.key exist, the CA signed the
# certificate, it is valid for another day, and it has the wanted names.
is_current() {
    local crt=$certs/$1.crt key=$certs/$1.key
    [[ -f $crt && -f $key ]] || return 1
    openssl verify -CAfile "$certs/ca.crt" "$crt" >/dev/null 2>&1 || return 1
    openssl x509 -in "$crt" -noout -checkend 86400 >/dev/null 2>&1 || return 1
    # The certificate must belong to the key.
    [[ $(openssl x509 -in "$crt" -noout -pubkey) == $(openssl pkey -in "$key" -pubout) ]] \
        || return 1
    [[ -z $2 ]] || [[ $(cat "$certs/$1.san" 2>/dev/null) == "$2" ]]
}

# sign NAME CN EXTENSIONS: a new key and certificate NAME.key/NAME.crt.
sign() {
    local name=$1 cn=$2 ext=$3
    newkey "$work/$name.key"
    openssl req -new -key "$work/$name.key" -subj "/CN=$cn" -out "$work/$name.csr" 2>/dev/null \
        || die "openssl could not make the $name request"
    printf '%s\n' "$ext" >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -sha256 \
        -extfile "$work/$name.ext" -out "$work/$name.crt" 2>/dev/null \
        || die "openssl could not sign the $name certificate"
    mv "$work/$name.key" "$certs/$name.key"
    mv "$work/$name.crt" "$certs/$name.crt"
}

common_ext="basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer"

# --- server ------------------------------------------------------------------
if is_current server "$san"; then
    echo "mkcerts.sh: keeping $certs/server.crt"
else
    sign server cellwatch-broker "$common_ext
extendedKeyUsage = serverAuth
subjectAltName = $san"
    printf '%s' "$san" >"$certs/server.san"
    echo "mkcerts.sh: made $certs/server.crt for $san"
fi

# --- client ------------------------------------------------------------------
if is_current client ""; then
    echo "mkcerts.sh: keeping $certs/client.crt"
else
    sign client cellwatch-client "$common_ext
extendedKeyUsage = clientAuth"
    echo "mkcerts.sh: made $certs/client.crt"
fi

# Certificates are public; keys are not. Mosquitto reads server.key when it
# starts, as root, before dropping privileges; the group lets it reload too.
chmod 0644 "$certs/ca.crt" "$certs/server.crt" "$certs/client.crt" "$certs/server.san"
chmod 0600 "$certs/ca.key" "$certs/client.key"
chmod 0640 "$certs/server.key"
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$certs/server.key"
fi
