from __future__ import annotations

import pytest

from cellwatch.shared.errors import TopicError
from cellwatch.shared.topics import ImageOrigin, Topics, is_valid_name

T = Topics()


def test_builders_follow_design() -> None:
    assert T.lab_images("client-labA") == "cellwatch/images/client-labA"
    assert T.lab_images("client-labA", "scope-1") == "cellwatch/images/client-labA/scope-1"
    assert T.lab_images_filters() == ("cellwatch/images/+", "cellwatch/images/+/+")
    assert T.lab_images_shared_filters() == (
        "$share/cellwatch-nodes/cellwatch/images/+",
        "$share/cellwatch-nodes/cellwatch/images/+/+",
    )
    assert T.node_lab_images("n", "a", "s") == "cellwatch/nodes/n/images/a/s"
    assert T.node_lab_images_filters("n") == (
        "cellwatch/nodes/n/images/+",
        "cellwatch/nodes/n/images/+/+",
    )
    assert T.node_images("node-1") == "cellwatch/nodes/node-1/images"
    assert T.results("client-labA") == "cellwatch/results/client-labA"
    assert T.replies_filter("client-labA") == "cellwatch/replies/client-labA/#"
    assert T.status("n") == "cellwatch/nodes/n/status"
    assert T.telemetry("n") == "cellwatch/nodes/n/telemetry"
    assert T.desired("n") == "cellwatch/nodes/n/desired"
    assert T.update("n") == "cellwatch/nodes/n/update"
    assert T.shadow("n") == "cellwatch/nodes/n/shadow"
    assert T.shadow_report("n") == "cellwatch/nodes/n/shadow-report"
    assert T.node_id_of(T.shadow_report("n")) == "n"
    assert T.fetch_reply("n") == "cellwatch/nodes/n/fetch"
    assert T.hub_fetch("n") == "cellwatch/hub/fetch/n"
    assert T.hub_fetch_filter() == "cellwatch/hub/fetch/+"
    assert T.hub_api("push") == "cellwatch/hub/api/push"
    assert T.replies("client", "x/1") == "cellwatch/replies/client/x/1"
    assert Topics("lab7").lab_images("a") == "lab7/images/a"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "a.b", "x" * 65, "é"])
def test_invalid_names_are_refused(bad: str) -> None:
    assert not is_valid_name(bad)
    with pytest.raises(TopicError):
        T.lab_images(bad)
    with pytest.raises(TopicError):
        T.lab_images("labA", bad)
    with pytest.raises(TopicError):
        T.replies_filter(bad)


def test_the_origin_of_an_image_is_the_account_its_topic_names() -> None:
    assert T.origin_of("cellwatch/images/labA") == ImageOrigin("labA", None)
    assert T.origin_of("cellwatch/images/labA/scope-1") == ImageOrigin("labA", "scope-1")
    assert T.origin_of("cellwatch/nodes/n/images/labA/s", "n") == ImageOrigin("labA", "s")
    for bad in (
        "cellwatch/images/labA/s/deeper",
        "cellwatch/images/bad.account",
        "cellwatch/images/labA/bad.scope",
        "cellwatch/images/",
        "cellwatch/nodes/n/images/labA",  # without node_id
        "cellwatch/nodes/n/images",  # the old direct topic names no account
        "cellwatch/results/labA",
    ):
        with pytest.raises(TopicError):
            T.origin_of(bad)
    for bad in ("cellwatch/nodes/other/images/labA", "cellwatch/nodes/n/images"):
        with pytest.raises(TopicError):
            T.origin_of(bad, "n")


def test_parse_node_id() -> None:
    assert T.node_id_of("cellwatch/nodes/node-3/status") == "node-3"
    with pytest.raises(TopicError):
        T.node_id_of("cellwatch/nodes/node-3")
    assert T.fetch_node_of("cellwatch/hub/fetch/node-3") == "node-3"
    for bad in ("cellwatch/hub/fetch", "cellwatch/hub/fetch/a/b", "cellwatch/hub/fetch/+"):
        with pytest.raises(TopicError):
            T.fetch_node_of(bad)


@pytest.mark.parametrize("prefix", ["", "a/#", "$SYS"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix)
