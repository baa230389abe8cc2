#!/usr/bin/env bash
# Write the broker's ACL file for the roles hub, operator, client and the nodes.
# See --help.
set -euo pipefail
# Byte-wise character ranges in the name checks, whatever the user's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/mkacl.sh [--prefix PREFIX] [--replace] [--client NAME]...
                       [--bridge SITE=ID[,ID...]]... [--relay ID]... DIR [NODE_ID...]

Writes DIR/acl, the Mosquitto ACL for cellwatch's roles (DESIGN.md, Topics and
Security):

  hub       reads node status/telemetry/update/shadow reports, every node's fetch
            requests (PREFIX/hub/fetch/+), field samples (PREFIX/hub/samples/#: no
            one else may read them), API requests, the list of revoked bundles and
            the sites' bridge links (PREFIX/sites/+/bridge); writes desired models,
            shadow orders, bundle chunks, sample upload answers
            (PREFIX/nodes/+/samples), API replies and the list of revoked bundles
            (PREFIX/hub/revoked: no one else may write it)
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
  bridge-SITE  (central broker) one block per --bridge SITE=ID,...: the account of
            a site's bridge (deploy/site_conf.py) writes only what a site forwards
            out, for the site's own node and relay ids (status, telemetry, update
            and shadow reports, fetch requests, field samples) and its link
            (PREFIX/sites/SITE/bridge); reads only what it forwards in for them
            (desired models, shadow orders, fetch replies, sample answers) and the
            revoked bundles
  ID        (a site's broker) one block per --relay ID: a site relay reads the
            site's fetch requests (PREFIX/hub/fetch/+) and answers them on any node's
            PREFIX/nodes/+/fetch; fetches from the hub on its own PREFIX/hub/fetch/ID
            and PREFIX/nodes/ID/fetch; reads the revoked bundles
  everyone  reads only its own replies: PREFIX/replies/USER/#

The nodes, lab clients, bridges and relays already in DIR/acl are kept, so
re-running with a new one adds it (a --bridge SITE given again replaces that site's
ids; --replace: write exactly the ones given). The file is replaced in one step; a
running broker picks it up on SIGHUP (or `systemctl reload mosquitto`).

  --prefix PREFIX  topic prefix (default: cellwatch)
  --replace        forget the nodes and lab clients already in DIR/acl
  --client NAME    add a lab client user (repeatable; create it with mkusers.sh --client)
  --bridge SITE=ID,...  add site SITE's bridge account bridge-SITE for the node and
                   relay ids at that site (repeatable; mkusers.sh --bridge SITE)
  --relay ID       add a site relay user (repeatable; mkusers.sh --relay ID)
EOF
}

die() {
    echo "mkacl.sh: $*" >&2
    exit 1
}

prefix=cellwatch
replace=false
clients=()
bridge_args=()
relay_args=()
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
        --bridge)
            [[ $# -ge 2 ]] || die "--bridge needs SITE=ID[,ID...]"
            bridge_args+=("$2")
            shift 2
            ;;
        --relay)
            [[ $# -ge 2 ]] || die "--relay needs an id"
            relay_args+=("$2")
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
bridge_marker='# bridge '
relay_marker='# relay '

valid_name() {
    [[ $1 =~ ^[A-Za-z0-9_-]{1,64}$ && $1 != hub && $1 != operator && $1 != client ]]
}

nodes=()
known_clients=()
declare -A site_ids=()
known_relays=()
if [[ $replace == false && -f $acl ]]; then
    while IFS= read -r line; do
        [[ $line == "$marker"* ]] && nodes+=("${line#"$marker"}")
        [[ $line == "$client_marker"* ]] && known_clients+=("${line#"$client_marker"}")
        if [[ $line == "$bridge_marker"* ]]; then
            entry=${line#"$bridge_marker"}
            site_ids[${entry%%=*}]=${entry#*=}
        fi
        [[ $line == "$relay_marker"* ]] && known_relays+=("${line#"$relay_marker"}")
    done <"$acl"
fi
for arg in ${bridge_args[@]+"${bridge_args[@]}"}; do
    [[ $arg == *=* ]] || die "--bridge $arg: use SITE=ID[,ID...] (the node and relay ids at the site)"
    site=${arg%%=*}
    ids=${arg#*=}
    [[ $site =~ ^[A-Za-z0-9_-]{1,64}$ ]] \
        || die "invalid site name '$site': use 1-64 characters from A-Z a-z 0-9 _ -"
    [[ -n $ids ]] || die "--bridge $arg: name the node and relay ids at site $site"
    IFS=, read -r -a list <<<"$ids"
    for id in "${list[@]}"; do
        valid_name "$id" \
            || die "invalid id '$id' at site $site: use 1-64 characters from A-Z a-z 0-9 _ - (not hub, operator, client)"
    done
    site_ids[$site]=$ids
done
for relay in ${relay_args[@]+"${relay_args[@]}"}; do
    valid_name "$relay" \
        || die "invalid relay id '$relay': use 1-64 characters from A-Z a-z 0-9 _ - (not hub, operator, client)"
    known_relays+=("$relay")
done
relays=()
if [[ ${#known_relays[@]} -gt 0 ]]; then
    mapfile -t relays < <(printf '%s\n' "${known_relays[@]}" | sort -u)
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
topic read $p/sites/+/bridge
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
    local site id
    for site in $(printf '%s\n' "${!site_ids[@]}" | sort); do
        cat <<EOF

$bridge_marker$site=${site_ids[$site]}
user bridge-$site
topic write $p/sites/$site/bridge
topic read $p/hub/revoked
EOF
        IFS=, read -r -a list <<<"${site_ids[$site]}"
        for id in "${list[@]}"; do
            cat <<EOF
topic write $p/nodes/$id/status
topic write $p/nodes/$id/telemetry
topic write $p/nodes/$id/update
topic write $p/nodes/$id/shadow-report
topic write $p/hub/fetch/$id
topic write $p/hub/samples/$id/#
topic read $p/nodes/$id/desired
topic read $p/nodes/$id/shadow
topic read $p/nodes/$id/fetch
topic read $p/nodes/$id/samples
EOF
        done
    done
    for id in ${relays[@]+"${relays[@]}"}; do
        cat <<EOF

$relay_marker$id
user $id
topic read $p/hub/fetch/+
topic write $p/nodes/+/fetch
topic write $p/hub/fetch/$id
topic read $p/nodes/$id/fetch
topic read $p/hub/revoked
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
echo "mkacl.sh: wrote $acl (${#nodes[@]} nodes, ${#clients[@]} lab clients, ${#site_ids[@]} bridges, ${#relays[@]} relays)"
