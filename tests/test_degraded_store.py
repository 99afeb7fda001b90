"""A state directory the daemon cannot write (found by tools/soak.py, issue #16: the daemon used
to refuse to start, which stopped the alerts too): the node comes up `degraded`, says why in its
log and on its node error topic, answers from an answered store in RAM (byte-identical on a
redelivery), and the next start on a usable state dir takes those replies over."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edged.domain import NodeState
from edged.service.answer_store import AnswerStore
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from edged.service.store_place import read_only_mount
from tests._mqtt import DaemonProcess, P, TestClient, daemon_config, mosquitto_pub, reply_to

STATUS = f"{P}/_node/test-node/status"
NODE_ERROR = f"{P}/_node/test-node/error"


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """systemd's RuntimeDirectory= for the daemon: where the volatile store goes."""
    run = tmp_path / "run-edged"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    return run


@pytest.fixture
def unusable(tmp_path: Path) -> Path:
    """A state_dir path with a file in the way: unusable to any user, root included."""
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path / "a-file" / "state"


def _ask(gateway: TestClient, query_id: str) -> bytes:
    gateway.publish(f"{P}/w1/query", {"id": query_id, "text": "Am I ok?", "max_tokens": 6})
    return gateway.wait_for(reply_to(query_id), timeout=20).payload


def test_an_unusable_state_dir_leaves_the_node_up_degraded_answering_and_alerting(
    broker: PrivateBroker,
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    runtime_dir: Path,
    unusable: Path,
) -> None:
    daemon = start_daemon(delivery={"state_dir": str(unusable)})
    assert daemon.state == NodeState.DEGRADED
    status = gateway.wait_for(lambda r: r.topic == STATUS, timeout=5)
    assert status.json()["state"] == "degraded"
    error = gateway.wait_for(lambda r: r.topic == NODE_ERROR, timeout=5).json()
    assert error["message"].startswith(f"delivery.state_dir = '{unusable}'")
    assert str(runtime_dir) in error["message"]

    first = _ask(gateway, "q-ram")
    assert json.loads(first)["id"] == "q-ram"
    assert (runtime_dir / "answered.sqlite3").exists()
    assert (runtime_dir.stat().st_mode & 0o777) == 0o700  # answers are health data
    # A redelivery of the same id is served from the volatile store, not generated again.
    assert _ask(gateway, "q-ram") == first
    assert daemon.metrics().counters.duplicates == 1

    vitals = {"ts": int(time.time()), "spo2": {"min": 85, "mean": 86}, "resp_rate": 26}
    mosquitto_pub(broker.port, f"{P}/w-sick/vitals", vitals)
    assert gateway.wait_for(lambda r: r.topic == f"{P}/w-sick/alert", timeout=5).json()


def test_the_next_start_on_a_usable_state_dir_takes_the_volatile_replies_over(
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    runtime_dir: Path,
    unusable: Path,
    tmp_path: Path,
) -> None:
    degraded = start_daemon(delivery={"state_dir": str(unusable)})
    first = _ask(gateway, "q-over")
    degraded.stop()

    good = tmp_path / "good-state"
    daemon = start_daemon(delivery={"state_dir": str(good)})
    assert daemon.state == NodeState.ONLINE
    assert not (runtime_dir / "answered.sqlite3").exists()
    assert daemon.metrics().answered_stored == 1
    # The query redelivered after the fix still gets the first answer, byte for byte.
    assert _ask(gateway, "q-over") == first
    assert daemon.metrics().counters.duplicates == 1


def test_with_no_usable_runtime_dir_either_the_store_is_kept_in_memory(
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    unusable: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "a-file" / "run"))
    daemon = start_daemon(delivery={"state_dir": str(unusable)})
    error = gateway.wait_for(lambda r: r.topic == NODE_ERROR, timeout=5).json()
    assert "this process's memory" in error["message"]
    first = _ask(gateway, "q-mem")
    assert _ask(gateway, "q-mem") == first
    assert daemon.state == NodeState.DEGRADED


def test_edged_run_on_an_unusable_state_dir_says_so_in_one_line_and_serves(
    broker: PrivateBroker, gateway: TestClient, unusable: Path, tmp_path: Path
) -> None:
    config = daemon_config(broker.port, unusable)
    proc = DaemonProcess(config, tmp_path)
    proc.start(RUNTIME_DIRECTORY=str(tmp_path / "run-edged"))
    try:
        gateway.wait_for(
            lambda r: r.topic == STATUS and r.json().get("state") == "degraded", timeout=60
        )
        log = proc.log()
        [line] = [x for x in log.splitlines() if f"delivery.state_dir = '{unusable}'" in x]
        assert "ERROR" in line and "serving degraded" in line
        assert f"answered queries are stored in {tmp_path / 'run-edged'}" in line
        assert "Traceback" not in log
        assert json.loads(_ask(gateway, "q-run"))["id"] == "q-run"
    finally:
        proc.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB file system of its own (root only), to make read-only or fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "card"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _answer_before(state_dir: Path, query_id: str) -> bytes:
    """A reply a previous run stored (and closed cleanly, so no -wal file is left)."""
    payload = json.dumps({"id": query_id, "text": "stored by the previous run"}).encode()
    store = AnswerStore(state_dir / "answered.sqlite3", ttl_s=3600)
    store.put("w1", query_id, f"{P}/w1/advice", payload, None)
    store.close()
    return payload


def test_a_read_only_card_is_served_degraded_and_its_old_replies_still_read(
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    runtime_dir: Path,
    small_tmpfs: Path,
) -> None:
    old = _answer_before(small_tmpfs, "q-before")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    daemon = start_daemon(delivery={"state_dir": str(small_tmpfs)})
    assert daemon.state == NodeState.DEGRADED
    error = gateway.wait_for(lambda r: r.topic == NODE_ERROR, timeout=5).json()
    assert "cannot be written" in error["message"]
    # Answered before the card went read-only: redelivered, it gets that answer, not a new one.
    assert _ask(gateway, "q-before") == old
    first = _ask(gateway, "q-ro")
    assert _ask(gateway, "q-ro") == first


def test_a_full_disk_at_start_keeps_the_answered_store(
    start_daemon: Callable[..., Daemon],
    gateway: TestClient,
    runtime_dir: Path,
    small_tmpfs: Path,
) -> None:
    """Found while building the read-only case: opening the store on a full disk failed with
    `disk I/O error`, which was taken for damage, and the good store was set aside (then the
    start failed anyway). Full storage is not damage: nothing is set aside."""
    old = _answer_before(small_tmpfs, "q-before")
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass
    daemon = start_daemon(delivery={"state_dir": str(small_tmpfs)})
    assert not list(small_tmpfs.glob("*.damaged-*"))
    assert _ask(gateway, "q-before") == old
    (small_tmpfs / "filler").unlink()
    first = _ask(gateway, "q-new")  # stored in RAM, or held until the disk took it
    assert _ask(gateway, "q-new") == first
    daemon.stop()
    # The next start, with room, has both replies in the durable store.
    start_daemon(delivery={"state_dir": str(small_tmpfs)})
    store = AnswerStore(small_tmpfs / "answered.sqlite3", ttl_s=3600)
    try:
        assert {
            r.payload for r in (store.get("w1", "q-before"), store.get("w1", "q-new")) if r
        } == {
            old,
            first,
        }
    finally:
        store.close()


def _mountinfo(root: Path, *lines: str) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text("".join(f"{line}\n" for line in lines))
    return root


ROOT_RW = "27 1 254:0 / / rw,relatime - ext4 /dev/mmcblk0p2 rw"


def test_a_card_remounted_read_only_is_seen_in_mountinfo(tmp_path: Path) -> None:
    """The kernel's format (proc(5)); a fake tree, since a live remount of a file system the
    daemon writes cannot be made here (EBUSY while a file is open for writing)."""
    state = Path("/var/lib/edged")
    root = _mountinfo(
        tmp_path / "a",
        ROOT_RW,
        # errors=remount-ro: the per-mount options may still say rw; the superblock's say ro
        "40 27 179:3 / /var/lib rw,relatime - ext4 /dev/mmcblk0p3 ro,errors=remount-ro",
    )
    assert read_only_mount(root, state)
    root = _mountinfo(tmp_path / "b", ROOT_RW, "40 27 179:3 / /var/lib ro,relatime - ext4 x rw")
    assert read_only_mount(root, state)
    # A read-write mount deeper down, over the read-only one, is where the store lives.
    root = _mountinfo(
        tmp_path / "c",
        "27 1 254:0 / / ro,relatime - ext4 /dev/root ro",
        "41 27 0:50 / /var/lib/edged rw,relatime - tmpfs tmpfs rw",
    )
    assert not read_only_mount(root, state)
    assert read_only_mount(root, Path("/var/lib/edged-other"))  # on /, not /var/lib/edged
    # The same mount point twice: the later mount shadows the earlier.
    root = _mountinfo(
        tmp_path / "d",
        ROOT_RW,
        "40 27 0:50 / /var/lib rw - tmpfs tmpfs rw",
        "42 40 0:51 / /var/lib ro - tmpfs tmpfs ro",
    )
    assert read_only_mount(root, state)
    root = _mountinfo(tmp_path / "e", ROOT_RW, r"40 27 0:50 / /srv/my\040card ro - vfat x ro")
    assert read_only_mount(root, Path("/srv/my card/state"))
    assert not read_only_mount(tmp_path / "no-proc", state)


def test_a_real_read_only_mount_is_seen(small_tmpfs: Path) -> None:
    assert not read_only_mount(Path("/"), small_tmpfs / "state")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert read_only_mount(Path("/"), small_tmpfs / "state")
