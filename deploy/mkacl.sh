#!/usr/bin/env bash
# Write the broker's ACL file for the roles hub, operator, client and the nodes.
# See --help.
set -euo pipefail
# Byte-wise character ranges in the name checks, whatever the user's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/mkacl.sh [--prefix PREFIX] [--replace] [--client NAME]... DIR [NODE_ID...]

Writes DIR/acl, the Mosquitto ACL for cellwatch's roles (DESIGN.md, Topics and
Security):

  hub       reads node status/telemetry/update/shadow reports, every node's fetch
            requests (PREFIX/hub/fetch/+), field samples (PREFIX/hub/samples/#: no
            one else may read them), API requests and the list of revoked
            bundles; writes desired models, shadow orders, bundle chunks, sample
            upload answers (PREFIX/nodes/+/samples), API replies
            and the list of revoked bundles (PREFIX/hub/revoked: no one else may
            write it)
  operator  writes API requests, reads its API replies and node status;
            may also publish test images (any images topic, PREFIX/images/# and
            PREFIX/nodes/+/images/#: also to clear an image a lab published
            retained) and read results
  client    the demo's lab account, shared by everyone who has its password: the
            same rules as a lab of its own, under the name client
  NAME      one block per --client NAME (a lab of its own, e.g. client-labA):
            publishes images only under its own name (PREFIX/images/NAME and
            PREFIX/images/NAME/SCOPE; to one node PREFIX/nodes/N/images/NAME[/SCOPE]),
            reads node status, its own results (PREFIX/results/NAME) and its own
            replies; nothing of another lab's
  NODE_ID   one block per node: reads every lab's images (PREFIX/images/ACCOUNT
            and PREFIX/images/ACCOUNT/SCOPE) and its own
            (PREFIX/nodes/NODE_ID/images/ACCOUNT[/SCOPE]), its own desired/shadow/
            fetch/samples topics, its own status and the revoked bundles; writes only
            its own status/telemetry/update/shadow-report, fetch
            requests (PREFIX/hub/fetch/NODE_ID), field samples
            (PREFIX/hub/samples/NODE_ID/#), results and replies
  everyone  reads only its own replies: PREFIX/replies/USER/#

The nodes and lab clients already in DIR/acl are kept, so re-running with a new
one adds it (--replace: write exactly the ones given). The file is replaced in one step; a
running broker picks it up on SIGHUP (or `systemctl reload mosquitto`).

  --prefix PREFIX  topic prefix (default: cellwatch)
  --replace        forget the nodes and lab clients already in DIR/acl
  --client NAME    add a lab client user (repeatable; create it with mkusers.sh --client)
EOF
}

die() {
    echo "mkacl.sh: $*" >&2
    exit 1
}

prefix=cellwatch
replace=false
clients=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --prefix)
            [[ $# -ge 2 ]] || die "--prefix needs a value"
            prefix=$2
            shift 2
            ;;
        --replace) replace=true; shift ;;
        --client)
            [[ $# -ge 2 ]] || die "--client needs a name"
            clients+=("$2")
            shift 2
            ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ $prefix =~ ^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$ ]] \
    || die "invalid prefix '$prefix': topic levels of A-Z a-z 0-9 _ - separated by /"

dir=$1
shift
acl=$dir/acl
marker='# node '
client_marker='# client '

valid_name() {
    [[ $1 =~ ^[A-Za-z0-9_-]{1,64}$ && $1 != hub && $1 != operator && $1 != client ]]
}

nodes=()
known_clients=()
if [[ $replace == false && -f $acl ]]; then
    while IFS= read -r line; do
        [[ $line == "$marker"* ]] && nodes+=("${line#"$marker"}")
        [[ $line == "$client_marker"* ]] && known_clients+=("${line#"$client_marker"}")
    done <"$acl"
fi
for node in "$@"; do
    valid_name "$node" \
        || die "invalid node id '$node': use 1-64 characters from A-Z a-z 0-9 _ - (not hub, operator, client)"
    nodes+=("$node")
done
for name in ${clients[@]+"${clients[@]}"}; do
    valid_name "$name" \
        || die "invalid client name '$name': use 1-64 characters from A-Z a-z 0-9 _ - (not hub, operator, client)"
    known_clients+=("$name")
done
# Sorted, each once.
if [[ ${#nodes[@]} -gt 0 ]]; then
    mapfile -t nodes < <(printf '%s\n' "${nodes[@]}" | sort -u)
fi
clients=()
if [[ ${#known_clients[@]} -gt 0 ]]; then
    mapfile -t clients < <(printf '%s\n' "${known_clients[@]}" | sort -u)
fi
for name in ${clients[@]+"${clients[@]}"}; do
    for node in ${nodes[@]+"${nodes[@]}"}; do
        [[ $name != "$node" ]] || die "'$name' cannot be both a node and a lab client"
    done
done

p=$prefix
# A lab account writes images only under a topic naming itself, so a node knows
# which account sent an image and answers only that account (DESIGN.md, Trust).
lab_block() {
    cat <<EOF
user $1
topic write $p/images/$1
topic write $p/images/$1/+
topic write $p/nodes/+/images/$1
topic write $p/nodes/+/images/$1/+
topic read $p/results/$1
topic read $p/nodes/+/status

EOF
}

write_acl() {
    cat <<EOF
# Mosquitto ACL for cellwatch, written by deploy/mkacl.sh: re-run the script
# instead of editing this file. A user may only do what a line below allows.

# Every user reads its own replies only (%u is the user name).
pattern read $p/replies/%u/#

user hub
topic read $p/nodes/+/status
topic read $p/nodes/+/telemetry
topic read $p/nodes/+/update
topic read $p/nodes/+/shadow-report
topic read $p/hub/fetch/+
topic read $p/hub/api/#
topic read $p/hub/samples/#
topic write $p/nodes/+/desired
topic write $p/nodes/+/shadow
topic write $p/nodes/+/fetch
topic write $p/nodes/+/samples
topic write $p/hub/replies/#
topic write $p/hub/revoked
topic read $p/hub/revoked

user operator
topic write $p/hub/api/#
topic read $p/hub/replies/operator/#
topic read $p/nodes/+/status
topic read $p/results/#
topic write $p/images/#
topic write $p/nodes/+/images/#

EOF
    local c
    for c in client ${clients[@]+"${clients[@]}"}; do
        [[ $c == client ]] || echo "$client_marker$c"
        lab_block "$c"
    done
    local n
    for n in ${nodes[@]+"${nodes[@]}"}; do
        cat <<EOF

$marker$n
user $n
topic read $p/images/+
topic read $p/images/+/+
topic read $p/nodes/$n/images/+
topic read $p/nodes/$n/images/+/+
topic read $p/nodes/$n/desired
topic read $p/nodes/$n/shadow
topic read $p/nodes/$n/fetch
topic read $p/nodes/$n/samples
topic read $p/hub/revoked
topic readwrite $p/nodes/$n/status
topic write $p/nodes/$n/telemetry
topic write $p/nodes/$n/update
topic write $p/nodes/$n/shadow-report
topic write $p/hub/fetch/$n
topic write $p/hub/samples/$n/#
topic write $p/results/+
topic write $p/replies/#
EOF
    done
}

mkdir -p "$dir"
tmp=$(mktemp "$dir/.acl.XXXXXX")
trap 'rm -f "$tmp"' EXIT
write_acl >"$tmp"
chmod 0640 "$tmp"
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$tmp"
fi
mv "$tmp" "$acl"
trap - EXIT
echo "mkacl.sh: wrote $acl (${#nodes[@]} nodes, ${#clients[@]} lab clients)"
