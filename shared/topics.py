"""Every MQTT topic cellwatch uses, built and parsed in one place (DESIGN.md, Topics).

Nothing else in the code base writes a topic as an f-string: call these helpers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cellwatch.shared.errors import TopicError

DEFAULT_PREFIX = "cellwatch"
SHARE_GROUP = "cellwatch-nodes"
RELAY_SHARE_GROUP = "cellwatch-relays"
"""A site's relays share its fetch requests (each request goes to one of them)."""
NAME_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
HUB_API_VERBS_PATTERN = r"[a-z][a-z0-9_.-]{0,31}"


def is_valid_name(value: str) -> bool:
    """True when value may stand for `{source}`, `{node_id}` or `{username}`."""
    return bool(_NAME_RE.match(value))


def check_name(value: str, what: str = "name") -> str:
    """Return value, or raise TopicError saying what is wrong with it."""
    if not is_valid_name(value):
        raise TopicError(f"invalid {what} {value!r}: must match {NAME_PATTERN}")
    return value


@dataclass(frozen=True)
class ImageOrigin:
    """Who sent an image, from its topic: the account the broker authenticated, and
    the scope (microscope) it named, if any."""

    account: str
    scope: str | None = None


@dataclass(frozen=True)
class Topics:
    """Topic builders for one prefix (default `cellwatch`)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("$"):
            raise TopicError(f"invalid topic prefix {self.prefix!r}")

    # -- images and results -------------------------------------------------
    # A lab account publishes images only under a topic naming itself:
    # `{prefix}/images/{account}[/{scope}]` (scope: the microscope's name), or
    # `{prefix}/nodes/{node_id}/images/{account}[/{scope}]` for one node. The broker's
    # ACL (deploy/mkacl.sh) enforces it, so the topic authenticates the account that a
    # node answers, on `replies/{account}/...` or `results/{account}` only (DESIGN.md,
    # Trust). Nodes subscribe to these exact shapes: an images topic that names no
    # account (`{prefix}/nodes/{node_id}/images`) or goes deeper reaches none.
    def lab_images(self, account: str, scope: str | None = None) -> str:
        """Where `account` publishes images for every node (the shared subscription)."""
        topic = f"{self.prefix}/images/{check_name(account, 'account')}"
        return topic if scope is None else f"{topic}/{check_name(scope, 'scope')}"

    def lab_images_filters(self) -> tuple[str, str]:
        """The two exact filters of lab images (with and without a scope level)."""
        return (f"{self.prefix}/images/+", f"{self.prefix}/images/+/+")

    def lab_images_shared_filters(self) -> tuple[str, str]:
        """lab_images_filters() in the nodes' shared subscription."""
        plain, scoped = self.lab_images_filters()
        return (f"$share/{SHARE_GROUP}/{plain}", f"$share/{SHARE_GROUP}/{scoped}")

    def node_lab_images(self, node_id: str, account: str, scope: str | None = None) -> str:
        """Where `account` publishes images for node_id only."""
        topic = f"{self.node_images(node_id)}/{check_name(account, 'account')}"
        return topic if scope is None else f"{topic}/{check_name(scope, 'scope')}"

    def node_lab_images_filters(self, node_id: str) -> tuple[str, str]:
        """lab_images_filters() of node_id's own images."""
        base = self.node_images(node_id)
        return (f"{base}/+", f"{base}/+/+")

    def origin_of(self, topic: str, node_id: str | None = None) -> ImageOrigin:
        """The account and scope of a lab images topic: `{prefix}/images/...`, or with
        node_id also `{prefix}/nodes/{node_id}/images/...`. TopicError for any other
        topic or an invalid name."""
        levels = self._image_levels(topic, node_id)
        account = check_name(levels[0], "account")
        scope = check_name(levels[1], "scope") if len(levels) == 2 else None
        return ImageOrigin(account, scope)

    def account_of(self, topic: str, node_id: str | None = None) -> str:
        """The account of a lab images topic (as origin_of, whatever its scope level
        says: the ACL lets only that account write under its name)."""
        return check_name(self._image_levels(topic, node_id)[0], "account")

    def _image_levels(self, topic: str, node_id: str | None) -> list[str]:
        """[account] or [account, scope] of an images topic (not checked yet)."""
        for head in (f"{self.prefix}/images/",) + (
            (f"{self.node_images(node_id)}/",) if node_id is not None else ()
        ):
            if topic.startswith(head):
                levels = topic[len(head) :].split("/")
                if len(levels) > 2:
                    raise TopicError(f"too many topic levels in {topic!r}: account[/scope]")
                return levels
        raise TopicError(f"not a lab images topic: {topic!r}")

    def node_images(self, node_id: str) -> str:
        """`{prefix}/nodes/{node_id}/images`: the base of node_lab_images. No one
        publishes on it itself (it names no account: the ACL allows it to no one)."""
        return f"{self.prefix}/nodes/{check_name(node_id, 'node_id')}/images"

    def results(self, account: str) -> str:
        """Where a node answers `account`'s image that has no (allowed) Response Topic."""
        return f"{self.prefix}/results/{check_name(account, 'account')}"

    def results_filter(self) -> str:
        return f"{self.prefix}/results/+"

    def replies(self, username: str, suffix: str) -> str:
        """A Response Topic a client may use: `{prefix}/replies/{username}/{suffix}`."""
        return f"{self.prefix}/replies/{check_name(username, 'username')}/{suffix}"

    def replies_filter(self, account: str) -> str:
        """The filter a Response Topic must match for a node to answer `account` on it
        (`response_topic_allowed`): `{prefix}/replies/{account}/#`."""
        return f"{self.prefix}/replies/{check_name(account, 'account')}/#"

    # -- per-node topics ----------------------------------------------------
    def _node(self, node_id: str, leaf: str) -> str:
        return f"{self.prefix}/nodes/{check_name(node_id, 'node_id')}/{leaf}"

    def status(self, node_id: str) -> str:
        return self._node(node_id, "status")

    def telemetry(self, node_id: str) -> str:
        return self._node(node_id, "telemetry")

    def desired(self, node_id: str) -> str:
        return self._node(node_id, "desired")

    def update(self, node_id: str) -> str:
        return self._node(node_id, "update")

    def shadow(self, node_id: str) -> str:
        """The hub's retained shadow order for node_id (`ShadowOrder`)."""
        return self._node(node_id, "shadow")

    def shadow_report(self, node_id: str) -> str:
        """node_id's shadow reports to the hub (`ShadowReport`: its state, its windows)."""
        return self._node(node_id, "shadow-report")

    def samples_reply(self, node_id: str) -> str:
        """Where the hub answers node_id's sample uploads (shared/sampletransfer.py)."""
        return self._node(node_id, "samples")

    def fetch_reply(self, node_id: str) -> str:
        return self._node(node_id, "fetch")

    def node_filter(self, leaf: str) -> str:
        """`{prefix}/nodes/+/{leaf}`, for the hub's fleet subscriptions."""
        return f"{self.prefix}/nodes/+/{leaf}"

    def node_id_of(self, topic: str) -> str:
        """The `{node_id}` of a `{prefix}/nodes/{node_id}/...` topic."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head or len(parts) != len(head) + 3 or parts[len(head)] != "nodes":
            raise TopicError(f"not a node topic: {topic!r}")
        return check_name(parts[len(head) + 1], "node_id")

    # -- hub ----------------------------------------------------------------
    def hub_fetch(self, node_id: str) -> str:
        """Where node_id publishes its FetchRequests: the ACL lets only that node write
        it, so the topic (not the payload) says who asks."""
        return f"{self.prefix}/hub/fetch/{check_name(node_id, 'node_id')}"

    def hub_fetch_filter(self) -> str:
        return f"{self.prefix}/hub/fetch/+"

    def hub_fetch_relay_subscription(self) -> str:
        """hub_fetch_filter() in the site relays' shared subscription."""
        return f"$share/{RELAY_SHARE_GROUP}/{self.hub_fetch_filter()}"

    def fetch_node_of(self, topic: str) -> str:
        """The `{node_id}` of a `{prefix}/hub/fetch/{node_id}` topic."""
        head = f"{self.prefix}/hub/fetch/"
        if not topic.startswith(head):
            raise TopicError(f"not a fetch request topic: {topic!r}")
        return check_name(topic[len(head) :], "node_id")

    def hub_samples_offer(self, node_id: str) -> str:
        """Where node_id offers a field sample to the hub: the ACL lets only that node
        write under `hub/samples/{node_id}` and only the hub read it."""
        return f"{self.prefix}/hub/samples/{check_name(node_id, 'node_id')}/offer"

    def hub_samples_chunk(self, node_id: str) -> str:
        """Where node_id sends a field sample's chunks."""
        return f"{self.prefix}/hub/samples/{check_name(node_id, 'node_id')}/chunk"

    def hub_samples_filters(self) -> tuple[str, str]:
        """(offers, chunks) of every node."""
        return (f"{self.prefix}/hub/samples/+/offer", f"{self.prefix}/hub/samples/+/chunk")

    def samples_node_of(self, topic: str) -> str:
        """The `{node_id}` of a `{prefix}/hub/samples/{node_id}/...` topic."""
        head = f"{self.prefix}/hub/samples/"
        levels = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(levels) != 2 or levels[1] not in ("offer", "chunk"):
            raise TopicError(f"not a samples topic: {topic!r}")
        return check_name(levels[0], "node_id")

    def hub_api(self, verb: str) -> str:
        if not re.match(rf"^{HUB_API_VERBS_PATTERN}$", verb):
            raise TopicError(f"invalid hub API verb {verb!r}")
        return f"{self.prefix}/hub/api/{verb}"

    def hub_api_filter(self) -> str:
        return f"{self.prefix}/hub/api/+"

    def hub_api_verb_of(self, topic: str) -> str:
        """The `{verb}` of a `{prefix}/hub/api/{verb}` topic (any text: the API says
        whether it knows it)."""
        head = f"{self.prefix}/hub/api/"
        if not topic.startswith(head):
            raise TopicError(f"not a hub API topic: {topic!r}")
        return topic[len(head) :]

    def hub_revoked(self) -> str:
        """The hub's revocation list (retained; only the hub may write it)."""
        return f"{self.prefix}/hub/revoked"

    def hub_replies(self, username: str, suffix: str) -> str:
        return f"{self.prefix}/hub/replies/{check_name(username, 'username')}/{suffix}"

    def hub_replies_filter(self) -> str:
        """Where the hub may answer an API request (`response_topic_allowed`)."""
        return f"{self.prefix}/hub/replies/+/#"

    # -- sites ----------------------------------------------------------------
    def site_link(self, site: str) -> str:
        """`{prefix}/sites/{site}/bridge`: the state of a site's bridge to the central
        broker, as Mosquitto's bridge notifications write it (`1` retained while up,
        `0` by the bridge's Will when the link drops; deploy/site_conf.py). Only that
        site's bridge account may write it (deploy/mkacl.sh --bridge)."""
        return f"{self.prefix}/sites/{check_name(site, 'site')}/bridge"

    def site_link_filter(self) -> str:
        return f"{self.prefix}/sites/+/bridge"

    def site_of_link(self, topic: str) -> str:
        """The `{site}` of a `{prefix}/sites/{site}/bridge` topic."""
        head, tail = f"{self.prefix}/sites/", "/bridge"
        if not (topic.startswith(head) and topic.endswith(tail)):
            raise TopicError(f"not a site link topic: {topic!r}")
        return check_name(topic[len(head) : -len(tail)], "site")


def response_topic_allowed(topic: str, allowed: str) -> bool:
    """The one check of a Response Topic: may a reply be published on `topic`?

    `allowed` is an MQTT topic filter: a reply route's policy builds it (from the
    request's own topic where that names who asks). The topic must have no wildcard
    and no NUL, and match the filter level by level, where a `+` level must be a valid
    name (`[A-Za-z0-9_-]{1,64}`: a user or node id) and a trailing `#` must match at
    least one character. A filter without wildcards allows exactly itself.
    """
    if any(c in topic for c in "+#\x00"):
        return False
    got = topic.split("/")
    for i, level in enumerate(allowed.split("/")):
        if level == "#":
            return bool("/".join(got[i:]))
        if i >= len(got):
            return False
        if level == "+":
            if not is_valid_name(got[i]):
                return False
        elif level != got[i]:
            return False
    return len(got) == len(allowed.split("/"))
