"""One soco process writes a run folder at a time (issue 26.1): a second `soco pretrain` or `soco transfer` into a
folder in use is refused in one line naming the folder and the holder, exits non-zero and changes no file; the lock
dies with its holder, even a SIGKILLed one."""

import json
import os
import signal
import subprocess
import sys

import pytest

from soco.cli.main import main
from soco.errors import SocoError
from soco.files import LOCK_NAME, folder_lock
from soco.run_folder import check_run_folder, mark_run_folder
from tests.data.proposals.conftest import make_image_folder

HOLD_LOCK_SCRIPT = """
import sys, time
from soco.files import folder_lock
with folder_lock(sys.argv[1], "soco pretrain"):
    print("locked", flush=True)
    time.sleep(120)
"""


def folder_contents(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_in_progress(folder, kind):
    """A folder as a run of `kind` leaves it before its first checkpoint, when nothing but the lock keeps a second
    run out: its marker and, for pretraining, its first records."""
    mark_run_folder(folder, kind)
    if kind == "pretrain":
        for name, text in {"config.yaml": "train:\n  seed: 0\n", "train.log": "starting at step 0\n",
                           "metrics.jsonl": json.dumps({"step": 1, "loss": 1.5}) + "\n"}.items():
            (folder / name).write_text(text)
    return folder_contents(folder)


def refusal_line(err, folder, command, pid):
    """The one line a refused call prints, checked: the folder, the holder's command and pid."""
    assert err.count("\n") == 1, err
    assert err.startswith(f"soco: error: {folder} is in use by another `{command}` run (pid {pid}, "), err
    assert "choose another --out" in err
    return err


def test_a_pretrain_into_a_folder_in_use_is_refused_and_the_folder_kept(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", 4, size=(64, 48))
    run = tmp_path / "runs" / "dual"
    run.mkdir(parents=True)
    before = run_in_progress(run, "pretrain")
    argv = ["pretrain", "--config", "byol_image_tiny", "--data", str(images), "--out", str(run), "--steps", "2",
            "--device", "cpu", "--quiet", "train.checkpoint_every=1"]
    with folder_lock(run, "soco pretrain"):
        for extra in ([], ["--seed", "1"], ["--resume"]):
            assert main([*argv, *extra]) == 2
            refusal_line(capsys.readouterr().err, run, "soco pretrain", os.getpid())
        assert set(folder_contents(run)) == set(before) | {LOCK_NAME}
    assert folder_contents(run) == before  # the holder's lock file goes with it; no other file changed


def test_a_transfer_into_a_folder_in_use_is_refused_and_the_folder_kept(tmp_path, capsys):
    run = tmp_path / "transfer"
    run.mkdir()
    before = run_in_progress(run, "transfer")
    absent = str(tmp_path / "absent.json")  # never read: the lock is taken before the data is loaded
    argv = ["transfer", "--weights", "none", "--train", absent, "--train-images", str(tmp_path), "--val", absent,
            "--val-images", str(tmp_path), "--out", str(run), "--device", "cpu", "--quiet"]
    with folder_lock(run, "soco transfer"):
        for extra in ([], ["--resume"]):
            assert main([*argv, *extra]) == 2
            refusal_line(capsys.readouterr().err, run, "soco transfer", os.getpid())
    assert folder_contents(run) == before


def test_the_lock_leaves_nothing_behind_and_a_new_folder_goes_if_nothing_was_written(tmp_path):
    fresh = tmp_path / "fresh"
    with folder_lock(fresh, "soco pretrain") as path:
        assert path == fresh / LOCK_NAME and path.read_text() == f"{os.getpid()} soco pretrain\n"
        assert check_run_folder(fresh, "pretrain") is False  # a starting run's own lock: still an empty folder
        with pytest.raises(SocoError, match=rf"^{fresh} is in use by another `soco pretrain` run \(pid {os.getpid()},"):
            with folder_lock(fresh, "soco transfer"):
                pass
    assert not fresh.exists()
    with folder_lock(fresh, "soco pretrain"):
        mark_run_folder(fresh, "pretrain")
    assert os.listdir(fresh) == ["soco-run.json"]


@pytest.mark.slow
def test_a_second_process_is_refused_until_the_holder_is_killed(tmp_path):
    images = make_image_folder(tmp_path / "images", 4, size=(64, 48))
    run = tmp_path / "run"
    run.mkdir()
    before = run_in_progress(run, "pretrain")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_SCRIPT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "soco", "pretrain", "--config", "byol_image_tiny", "--data", str(images), "--out",
             str(run), "--steps", "2", "--seed", "1", "--device", "cpu", "--quiet", "train.checkpoint_every=1"],
            capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        refusal_line(second.stderr, run, "soco pretrain", holder.pid)
        assert {k: v for k, v in folder_contents(run).items() if k != LOCK_NAME} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL left the lock file; the kernel dropped the lock: the next run takes it, and the folder is as it was.
    assert (run / LOCK_NAME).exists()
    with folder_lock(run, "soco pretrain"):
        assert check_run_folder(run, "pretrain") is True
    assert folder_contents(run) == before
