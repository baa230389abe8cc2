"""Lab client accounts of their own (mkusers.sh/mkacl.sh --client): each lab reads only
its own replies and results, and may still send images to every node."""

from __future__ import annotations

from pathlib import Path

from cellwatch.shared.topics import Topics
from tests.broker import Broker, Inbox, run_script

T = Topics()
LABS = ("client-labA", "client-labB")


def test_each_lab_reads_only_its_own_replies_and_results(tmp_path: Path) -> None:
    broker = Broker.create(tmp_path / "broker", nodes=["node-1"], clients=LABS)
    try:
        inboxes = {lab: Inbox() for lab in LABS}
        for lab, inbox in inboxes.items():
            broker.connect(lab, subscriptions=[("cellwatch/#", 1)], handler=inbox)
        node = broker.connect("node-1")
        for lab in LABS:  # what a node sends each lab
            assert node.publish_wait(T.replies(lab, "r1"), b"reply")
            assert node.publish_wait(T.results(lab), b"result")
        for lab in LABS:
            assert node.publish_wait(T.replies(lab, "done"), b"done")
        for lab, inbox in inboxes.items():
            assert inbox.wait_topic(T.replies(lab, "done"))
            assert set(inbox.topics()) == {
                T.replies(lab, "r1"),
                T.results(lab),
                T.replies(lab, "done"),
            }, lab
        lab_a = broker.connect("client-labA")
        assert lab_a.publish_wait(T.lab_images("client-labA"), b"img")
        assert lab_a.publish_wait(T.lab_images("client-labA", "scope-1"), b"img")
        assert lab_a.publish_wait(T.node_lab_images("node-1", "client-labA"), b"img")
        assert not lab_a.publish_wait(T.results("client-labB"), b"forged")
        assert not lab_a.publish_wait(T.replies("client-labB", "x"), b"forged")
        assert not lab_a.publish_wait(T.lab_images("client-labB"), b"img")
        assert not lab_a.publish_wait(T.lab_images("client-labB", "scope-1"), b"img")
        assert not lab_a.publish_wait(T.node_lab_images("node-1", "client-labB"), b"img")
        assert not lab_a.publish_wait(T.lab_images("client-labA", "a") + "/b", b"img")
        assert not lab_a.publish_wait(T.node_images("node-1"), b"img")  # names no account
    finally:
        broker.close_clients()
        broker.stop()


def test_lab_clients_are_kept_and_bad_names_refused(tmp_path: Path) -> None:
    d = tmp_path / "acl"
    run_script("mkusers.sh", "--client", "client-labA", str(d), "node-1")
    run_script("mkacl.sh", "--client", "client-labA", str(d), "node-1")
    run_script("mkacl.sh", str(d), "node-2")  # re-run: labA is kept
    acl = (d / "acl").read_text()
    assert "user client-labA" in acl and "topic read cellwatch/results/client-labA" in acl
    assert (d / "secrets" / "client-labA.password").is_file()
    for bad in ("client", "a b", "x" * 65):
        r = run_script("mkacl.sh", "--client", bad, str(d), check=False)
        assert r.returncode != 0 and "invalid client name" in r.stderr
        r = run_script("mkusers.sh", "--client", bad, str(d), check=False)
        assert r.returncode != 0 and "invalid client name" in r.stderr
    r = run_script("mkacl.sh", "--client", "node-1", str(d), check=False)
    assert r.returncode != 0 and "both a node and a lab client" in r.stderr
