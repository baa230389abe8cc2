#!/usr/bin/env bash
# Create or extend the broker's password file: users hub, operator, client, one user
# per lab client (--client), per site bridge (--bridge), per site relay (--relay) and
# one user per node (user name = node id). See --help.
set -euo pipefail
# Byte-wise character ranges in the name checks, whatever the user's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/mkusers.sh [--client NAME]... [--bridge SITE]... [--relay ID]... DIR [NODE_ID...]

Creates (or extends) DIR/passwd, the Mosquitto password file, with the users
hub, operator, client (a lab client shared by everyone who has its password),
one user per --client NAME (a lab of its own, e.g. client-labA: mkacl.sh lets it
read only its own replies and results), one user bridge-SITE per --bridge SITE (on
the central broker: the account of that site's bridge, deploy/site_conf.py), one
user per --relay ID (on a site's broker: a bundle relay, `cellwatch-hub relay`) and
one user per NODE_ID (a node logs in as its node id).

Each new user gets a random password, stored in DIR/secrets/USER.password
(mode 0600): hand that file to the hub, the operator's CLI, the lab clients or
the node (settings: mqtt.password_file). Re-running is safe: users already in
DIR/passwd keep their password, only missing users are added.

NAME, SITE, ID and NODE_ID must match [A-Za-z0-9_-]{1,64} and must not be hub,
operator or client.

Needs mosquitto_passwd (package mosquitto) and openssl. When run as root and a
"mosquitto" group exists, DIR/passwd is made root:mosquitto mode 0640, because
Mosquitto reads it after dropping privileges.
EOF
}

die() {
    echo "mkusers.sh: $*" >&2
    exit 1
}

roles=(hub operator client)
clients=()
bridges=()
relays=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --client)
            [[ $# -ge 2 ]] || die "--client needs a name"
            clients+=("$2")
            shift 2
            ;;
        --bridge)
            [[ $# -ge 2 ]] || die "--bridge needs a site name"
            bridges+=("$2")
            shift 2
            ;;
        --relay)
            [[ $# -ge 2 ]] || die "--relay needs an id"
            relays+=("$2")
            shift 2
            ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }

dir=$1
shift

check_name() {
    [[ $2 =~ ^[A-Za-z0-9_-]{1,64}$ ]] \
        || die "invalid $1 '$2': use 1-64 characters from A-Z a-z 0-9 _ -"
    local role
    for role in "${roles[@]}"; do
        [[ $2 != "$role" ]] || die "invalid $1 '$2': it is the name of a role"
    done
}
for name in ${clients[@]+"${clients[@]}"}; do
    check_name "client name" "$name"
done
for site in ${bridges[@]+"${bridges[@]}"}; do
    check_name "site name" "$site"
done
for relay in ${relays[@]+"${relays[@]}"}; do
    check_name "relay id" "$relay"
done
for node in "$@"; do
    check_name "node id" "$node"
done
bridge_users=()
for site in ${bridges[@]+"${bridges[@]}"}; do
    bridge_users+=("bridge-$site")
done

passwd_cmd=$(command -v mosquitto_passwd || echo /usr/bin/mosquitto_passwd)
[[ -x $passwd_cmd ]] || die "mosquitto_passwd not found: apt-get install mosquitto"
command -v openssl >/dev/null || die "openssl not found: apt-get install openssl"

mkdir -p "$dir"
umask 077
mkdir -p "$dir/secrets"
chmod 0700 "$dir/secrets"
passwd=$dir/passwd
[[ -e $passwd ]] || : >"$passwd"

has_user() {
    grep -q "^$1:" "$passwd"
}

# New users go through a private plain-text file that mosquitto_passwd -U hashes
# in place, so no password ever appears on a command line.
work=$(mktemp -d "$dir/.mkusers.XXXXXX")
trap 'rm -rf "$work"' EXIT
plain=$work/new

added=()
for user in "${roles[@]}" ${clients[@]+"${clients[@]}"} ${bridge_users[@]+"${bridge_users[@]}"} \
    ${relays[@]+"${relays[@]}"} "$@"; do
    if has_user "$user"; then
        [[ -e $dir/secrets/$user.password ]] \
            || echo "mkusers.sh: note: $user is in $passwd but has no secrets file; its password is left as it is" >&2
        continue
    fi
    # A user listed twice on the command line is added once.
    if [[ -e $plain ]] && grep -q "^$user:" "$plain"; then
        continue
    fi
    secret=$dir/secrets/$user.password
    if [[ ! -s $secret ]]; then
        openssl rand -base64 24 | tr -d '\n' >"$secret.tmp"
        mv "$secret.tmp" "$secret"
    fi
    chmod 0600 "$secret"
    printf '%s:%s\n' "$user" "$(cat "$secret")" >>"$plain"
    added+=("$user")
done

if [[ ${#added[@]} -gt 0 ]]; then
    "$passwd_cmd" -U "$plain" >/dev/null || die "mosquitto_passwd could not hash the new passwords"
    # Replace the file in one step so a running broker never reads half of it.
    cat "$passwd" "$plain" >"$work/passwd"
    mv "$work/passwd" "$passwd"
fi

chmod 0640 "$passwd"
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$passwd"
fi

if [[ ${#added[@]} -gt 0 ]]; then
    echo "mkusers.sh: added ${added[*]} to $passwd (passwords in $dir/secrets/)"
else
    echo "mkusers.sh: $passwd already has every user"
fi
