import os

import pytest

from pneumo.core.errors import OutputLocked, PneumoError
from pneumo.core.fileio import FileLock, atomic_write, file_sha256, read_regular, require_apart


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_atomic_write_gives_the_permissions_of_a_plain_new_file(tmp_path):
    # Temp files are created 0600; a checkpoint on a shared machine must be readable as usual.
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared.pt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o640


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_lock_is_exclusive_and_released(tmp_path):
    with FileLock(tmp_path / "x.lock", "busy: pid {pid}"):
        with pytest.raises(OutputLocked, match=f"busy: pid {os.getpid()}"):
            with FileLock(tmp_path / "x.lock", "busy: pid {pid}"):
                pass
    with FileLock(tmp_path / "x.lock", "busy"):  # released when the holder leaves
        pass


@pytest.mark.parametrize("plant", ["symlink", "hard link", "fifo", "someone's notes"])
def test_a_lock_never_follows_or_cuts_short_what_is_planted_at_its_name(tmp_path, plant):
    """As root's cron job, `ln -s victim RUN/.lock` must not truncate the victim (nor a hard link, nor
    a FIFO hang the job): the lock is refused in one sentence and the file is left as it was."""
    from pneumo.core.errors import PneumoError

    victim, lock = tmp_path / "victim.txt", tmp_path / "out.csv.lock"
    victim.write_text("precious\n")
    if plant == "symlink":
        lock.symlink_to(victim)
    elif plant == "hard link":
        os.link(victim, lock)
    elif plant == "fifo":
        os.mkfifo(lock)
    else:
        lock.write_text("my notes, not a pid\n")
    with pytest.raises(PneumoError, match="out.csv.lock") as refused:
        with FileLock(lock, "busy"):
            pass
    assert not isinstance(refused.value, OutputLocked) and refused.value.exit_code == 2
    assert victim.read_text() == "precious\n"


def test_a_lock_file_holds_the_holders_pid_and_is_taken_over_after_it(tmp_path):
    lock = tmp_path / "out.csv.lock"
    lock.write_text("4242\n" + " " * 40)  # an older pneumo's, longer: still a pid file
    with FileLock(lock, "busy"):
        assert lock.read_text().split() == [str(os.getpid())]
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            with FileLock(lock, "held by pid {pid}"):
                pass
    with FileLock(lock, "busy"):  # released: taken again
        pass


def test_outputs_are_kept_apart_from_inputs_and_each_other_under_any_name(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    os.symlink(model, tmp_path / "link.pt")
    os.link(model, tmp_path / "hard.pt")
    for alias in ("link.pt", "hard.pt", "model.pt"):
        with pytest.raises(PneumoError, match=f"--out .*{alias} is --checkpoint too"):
            require_apart({"--out": tmp_path / alias}, {"--checkpoint": model})
    with pytest.raises(PneumoError, match="--log-file .* is --out too"):
        require_apart({"--out": tmp_path / "new.csv", "--log-file": tmp_path / "new.csv"}, {})
    for odd in ("/dev/null", "/dev/zero"):
        with pytest.raises(PneumoError, match="not a regular file"):
            require_apart({"--out": odd}, {})
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(PneumoError, match="link loop"):
        require_apart({"--out": tmp_path / "loop"}, {})
    require_apart({"--out": tmp_path / "new.csv", "--log-file": tmp_path / "job.log"}, {"--checkpoint": model})


def test_read_regular_refuses_what_could_block_or_fill_memory(tmp_path):
    os.mkfifo(tmp_path / "fifo.csv")
    for path in (tmp_path / "fifo.csv", "/dev/zero", tmp_path):
        with pytest.raises(PneumoError, match="not a regular file"):
            read_regular(path, "manifest")
    (tmp_path / "big.csv").write_bytes(b"x" * 2048)
    with pytest.raises(PneumoError, match="larger than"):
        read_regular(tmp_path / "big.csv", "manifest", limit=1024)
    assert read_regular(tmp_path / "big.csv", "manifest") == b"x" * 2048


def test_atomic_write_refuses_a_folder(tmp_path):
    with pytest.raises(PneumoError, match="is a folder"):
        atomic_write(tmp_path, lambda f: f.write(b""))
