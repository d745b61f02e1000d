"""The checkpoint helpers: event files rewound to a save, half-written checkpoints removed, distributed
checkpoints loaded only when their signature verifies, stale warm-start folders cleaned."""

import hashlib
import hmac
import json
import os
import subprocess
import sys

import pytest

from dibs.resume import LAST, UntrustedCheckpoint, check_trusted, remove_unfinished, rewind_event_files


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "config" / "checkpoint.key"
    monkeypatch.setenv("DIBS_CHECKPOINT_KEY", str(path))
    return path


def test_event_files_are_cut_back_to_the_save_and_later_ones_deleted(tmp_path):
    tb = tmp_path / "tb"
    tb.mkdir()
    (tb / "events.out.tfevents.1.host.1.0").write_bytes(b"a" * 100)
    (tb / "events.out.tfevents.2.host.2.0").write_bytes(b"b" * 50)  # written after the save
    (tb / "hparams.yaml").write_text("x: 1\n")
    cut, deleted = rewind_event_files(tmp_path, {"tb/events.out.tfevents.1.host.1.0": 60})
    assert (cut, deleted) == (1, 1)
    assert (tb / "events.out.tfevents.1.host.1.0").read_bytes() == b"a" * 60
    assert not (tb / "events.out.tfevents.2.host.2.0").exists() and (tb / "hparams.yaml").exists()


def test_half_written_checkpoints_are_removed_and_committed_ones_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("iter_001.ckpt", "iter_002.ckpt"):
        (folder / name).write_bytes(b"x")
    (folder / "iter_001.json").write_text("{}")  # committed: it has its sidecar
    (folder / "iter_003.ckpt").mkdir()  # a distributed save cut short: no sidecar
    (folder / "iter_003.json.tmp-12").write_text("{")
    os.symlink("iter_001.ckpt", folder / LAST)
    removed = remove_unfinished(folder)
    assert sorted(removed) == ["iter_002.ckpt", "iter_003.ckpt", "iter_003.json.tmp-12"]
    assert sorted(p.name for p in folder.iterdir()) == ["iter_001.ckpt", "iter_001.json", LAST]


def _signature(folder, key: bytes) -> str:
    """The documented signature: HMAC-SHA256 over "<relative name>\\0<sha256 hex>\\n" of every file, by name."""
    lines = "".join(
        f"{p.relative_to(folder).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
        for p in sorted(q for q in folder.rglob("*") if q.is_file())
    )
    return hmac.new(key, lines.encode(), hashlib.sha256).hexdigest()


def _distributed_checkpoint(folder, key: bytes | None):
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"pickled metadata")
    (folder / "__0_0.distcp").write_bytes(b"shard of rank 0")
    digest = _signature(folder, key) if key else None
    sidecar = {"iterations_done": 1, "global_step": 4, "costs": {}, "stopped": False, "events": {}}
    (folder.with_suffix(".json")).write_text(json.dumps({**sidecar, "metadata_hmac": digest}))
    return folder


def test_a_distributed_checkpoint_loads_only_when_its_signature_verifies(tmp_path, key_file):
    key_file.parent.mkdir(parents=True)
    key = os.urandom(32)
    key_file.write_text(key.hex())
    ours = _distributed_checkpoint(tmp_path / "ours.ckpt", key)
    check_trusted(ours, trust=False)  # signed with this machine's key: loads
    (ours / "__0_0.distcp").write_bytes(b"a shard with a pickle in it")  # a shard altered after the save
    with pytest.raises(UntrustedCheckpoint, match="do not match the signature"):
        check_trusted(ours, trust=False)
    check_trusted(ours, trust=True)  # the user's explicit consent
    foreign = _distributed_checkpoint(tmp_path / "foreign.ckpt", os.urandom(32))  # another machine's key
    with pytest.raises(UntrustedCheckpoint, match="checkpoint.trust=true"):
        check_trusted(foreign, trust=False)
    bare = tmp_path / "bare.ckpt"
    bare.mkdir()
    (bare / ".metadata").write_bytes(b"x")
    with pytest.raises(UntrustedCheckpoint, match="no dibs sidecar"):
        check_trusted(bare, trust=False)


def test_without_a_key_no_distributed_checkpoint_is_trusted(tmp_path, key_file):
    ckpt = _distributed_checkpoint(tmp_path / "x.ckpt", os.urandom(32))
    with pytest.raises(UntrustedCheckpoint, match="no checkpoint key"):
        check_trusted(ckpt, trust=False)


def test_a_single_file_checkpoint_needs_no_signature(tmp_path, key_file):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"torch.load(weights_only=True) reads it")
    check_trusted(path, trust=False)


def test_a_copied_distributed_checkpoint_is_refused_by_train_py_before_any_work(tmp_path, key_file):
    ckpt = _distributed_checkpoint(tmp_path / "elsewhere.ckpt", None)
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={ckpt}"]
    env = {**os.environ, "DIBS_CHECKPOINT_KEY": str(key_file)}
    proc = subprocess.run(
        cmd,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0 and "hold Python pickles, and loading them can run arbitrary code" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stale_warm_start_folders_of_dead_processes_are_removed(tmp_path):
    import socket

    from dibs.lit.assemble import _remove_stale_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"abc.tmp-{host}-{int(dead.stdout)}"
    alive = tmp_path / f"abc.tmp-{host}-{os.getpid()}"
    other_host = tmp_path / "abc.tmp-elsewhere-1"
    for folder in (stale, alive, other_host):
        folder.mkdir()
    _remove_stale_staging(tmp_path)
    assert not stale.exists() and alive.exists() and other_host.exists()  # another host's: only after a day
