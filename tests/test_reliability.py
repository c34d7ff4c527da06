"""Faults on purpose: full and read-only disks at every write, SIGKILL and SIGINT at seeded points of
`rhovae train` and `rhovae compare`, two processes on one folder, damaged inputs. The promise each test
proves is listed in docs/reliability.md.

Every training here runs on one CPU thread (in this process and in the subprocesses), so a run and its
resumed twin compute bit for bit the same numbers and the module stays fast on a busy 2-core machine.
"""

import builtins
import csv
import errno
import gzip
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images, write_idx_dataset

from rhovae import cli
from rhovae.cli import main
from rhovae.data import read_idx, write_idx
from rhovae.errors import RhovaeError
from rhovae.experiments import IN_USE, Experiment, compare, load_experiment, print_summary, write_report
from rhovae.runs import _TEMPORARY, RunInUse, RunLock, load_checkpoint, write_text_atomic

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING = ("epoch_seconds", "samples_per_second")
SEED = 20261127  # chooses the kill points


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny IDX dataset of conftest (400 train / 100 test images of 12x12), shared by the module."""
    return write_idx_dataset(tmp_path_factory.mktemp("data") / "idx")


def tiny(data, run, epochs, *extra):
    return [
        "-q", "train", "--dataset", "mnist", "--data-dir", str(data), "--val-size", "100",
        "--latent-dim", "3", "--hidden", "16", "--batch-size", "64", "--epochs", str(epochs),
        "--device", "cpu", "--run-dir", str(run), "--no-progress", *extra,
    ]  # fmt: skip


def metrics(run):
    """metrics.csv without its timing columns."""
    with open(Path(run) / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def same_weights(a, b):
    wa, wb = (torch.load(Path(p), weights_only=True)["model"] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def temporaries(folder):
    return sorted(str(p) for p in Path(folder).rglob("*") if _TEMPORARY.match(p.name))


def error_line(err):
    """The CLI's stderr is exactly one line, ``rhovae: error: ...``, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rhovae: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 3-epoch run with pictures, and the destinations of its atomic renames in order
    (the points where a kill or interrupt is most likely to hurt)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    events = []
    real = os.replace

    def replace(src, dst, **kw):
        events.append(Path(dst).name)
        return real(src, dst, **kw)

    os.replace = replace
    try:
        torch.set_num_threads(1)
        assert main(tiny(data, run, 3)) == 0
    finally:
        os.replace = real
    return run, events


# --- killed and interrupted processes ------------------------------------------------------------------


def _rhovae(argv, folder, hook):
    """The body of a `rhovae ARGV` process, its output in ``folder``/out and /err. With ``hook`` = (n,
    when, signal) it sends itself that signal at the n-th atomic rename (``when`` "before" or "after"
    it) or at the n-th training step (``when`` "step"): a real signal at a chosen point, so every run
    of a test is the same."""
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(Path(folder) / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    if hook is not None:
        n, when, sig = hook
        count = 0

        def counted(real, before, after):
            def call(*args, **kwargs):
                nonlocal count
                count += 1
                if count == n and before:
                    os.kill(os.getpid(), sig)
                result = real(*args, **kwargs)
                if count == n and after:
                    os.kill(os.getpid(), sig)
                return result

            return call

        if when == "step":
            torch.Tensor.backward = counted(torch.Tensor.backward, True, False)
        else:
            os.replace = counted(os.replace, when == "before", when == "after")
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def rhovae_process(tmp_path_factory):
    """Starts `rhovae ARGV` as a process of its own, forked from a server that imported rhovae once: a
    kill kills a real process, without paying torch's import for each one. Returns the process and the
    folder with its output."""
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo: what the first optimiser imports (2 s); matplotlib: what the pictures need
    modules = ["rhovae.cli", "rhovae.train", "rhovae.evaluate", "rhovae.experiments", "rhovae.plots"]
    context.set_forkserver_preload([*modules, "torch._dynamo", "matplotlib.pyplot", "scipy.stats"])
    root = tmp_path_factory.mktemp("processes")
    numbers = itertools.count()

    def start(argv, hook=None):
        folder = root / str(next(numbers))
        folder.mkdir()
        proc = context.Process(target=_rhovae, args=(argv, folder, hook))
        proc.start()
        return proc, folder

    return start


def finish(proc, timeout=120):
    proc.join(timeout)
    assert proc.exitcode is not None, "the process did not finish"
    return proc.exitcode


def test_sigkill_at_seeded_points_of_train_then_resume_gives_the_uninterrupted_run(
    data, reference, tmp_path, capsys, rhovae_process
):
    ref, events = reference
    rng = random.Random(SEED)
    n = rng.randrange(1, len(events) + 1)
    points = [(n, rng.choice(["before", "after"])), (rng.randrange(2, 15), "step")]  # a step: mid-epoch
    runs = [tmp_path / f"run{i}" for i in range(len(points))]
    procs = [
        rhovae_process(tiny(data, run, 3), (n, when, signal.SIGKILL))
        for run, (n, when) in zip(runs, points, strict=True)
    ]
    for run, (n, when), (proc, folder) in zip(runs, points, procs, strict=True):
        where = f"SIGKILL {when} " + (f"rename {n} ({events[n - 1]})" if when != "step" else f"step {n}")
        assert finish(proc) == -signal.SIGKILL, (where, (folder / "err").read_text())
        again = tiny(data, run, 3, *(["--resume"] if (run / "config.toml").exists() else []))
        assert main(again) == 0, (where, capsys.readouterr().err)
        assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3], where  # each epoch exactly once
        assert metrics(run) == metrics(ref), where
        assert same_weights(run / "last.pt", ref / "last.pt"), where
        assert same_weights(run / "best.pt", ref / "best.pt"), where
        assert not temporaries(run), where  # the next lock holder removed what the killed writer left


def test_sigint_in_epoch_1_and_in_epoch_2_says_what_exists(data, reference, tmp_path, rhovae_process):
    # 5 training steps per epoch: step 3 is in epoch 1, step 7 in epoch 2; rename 2 is epoch 1's last.pt
    # (an epoch's unit is saved last.pt first: before it lands, still no epoch has finished)
    cases = {"epoch1": (3, "step"), "epoch2": (7, "step"), "saving1": (2, "before")}
    procs = {
        name: rhovae_process(tiny(data, tmp_path / name, 3, "--no-pictures"), (n, when, signal.SIGINT))
        for name, (n, when) in cases.items()
    }
    for name, (proc, folder) in procs.items():
        run, err = tmp_path / name, None
        assert finish(proc) == 130, (folder / "err").read_text()
        err = (folder / "err").read_text()
        line = err.strip().splitlines()[-1]
        if (run / "last.pt").exists():
            epoch = load_checkpoint(run / "last.pt")["epoch"]
            saved = f"epoch {epoch} of 3 is saved in {run / 'last.pt'} (continue with --resume)"
            assert line == f"rhovae: interrupted; {saved}"
            assert [int(r["epoch"]) for r in metrics(run)] == list(range(1, epoch + 1))
        else:
            assert (
                line == "rhovae: interrupted; no epoch had finished; run the same command again to start over"
            )
        assert not temporaries(run)  # an interrupted write removes its temporary file
    assert not (tmp_path / "epoch1" / "last.pt").exists()
    assert not (tmp_path / "saving1" / "last.pt").exists() and not (tmp_path / "saving1" / "best.pt").exists()
    assert load_checkpoint(tmp_path / "epoch2" / "last.pt")["epoch"] == 1
    # and the commands the messages suggest finish the runs as if nothing had happened
    assert main(tiny(data, tmp_path / "epoch2", 3, "--no-pictures", "--resume")) == 0
    assert main(tiny(data, tmp_path / "saving1", 3, "--no-pictures")) == 0
    for name in ("epoch2", "saving1"):
        assert metrics(tmp_path / name) == metrics(reference[0])  # pictures or not, the same numbers


def toy(data, **run):
    return Experiment(
        name="toy",
        grid={"model": ["mlp"], "dataset": ["mnist"], "posterior": ["diagonal", "ar1"], "seed": [0]},
        run={"data_dir": str(data), "val_size": 100, "latent_dim": 3, "hidden": 16, "epochs": 2,
             "batch_size": 100, "device": "cpu", "pictures": False, **run},
        iwae_k=5,
    )  # fmt: skip


def toy_toml(data, path, epochs=2):
    path.write_text(
        'name = "toy"\n[grid]\nmodel = ["mlp"]\ndataset = ["mnist"]\nposterior = ["diagonal", "ar1"]\n'
        f'seed = [0]\n[run]\ndata_dir = "{data}"\nval_size = 100\nlatent_dim = 3\nhidden = 16\n'
        f'epochs = {epochs}\nbatch_size = 100\ndevice = "cpu"\npictures = false\n[evaluate]\niwae_k = 5\n'
    )
    return path


def report_rows(out):
    with open(out / "runs.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def test_sigkill_of_compare_then_compare_again_gives_the_uninterrupted_report(data, tmp_path, rhovae_process):
    exp = toy(data)
    # renames of the grid: per run config.toml, per epoch best.pt, last.pt, metrics.csv, then
    # evaluation.json; 2 runs x 8
    n = random.Random(SEED).randrange(1, 17)
    argv = ["-q", "compare", str(toy_toml(data, tmp_path / "toy.toml")), "--out", str(tmp_path / "out")]
    proc, folder = rhovae_process(argv, (n, "after", signal.SIGKILL))
    compare(exp, tmp_path / "ref")  # meanwhile, the uninterrupted grid
    assert finish(proc) == -signal.SIGKILL, (folder / "err").read_text()
    compare(exp, tmp_path / "out")
    assert report_rows(tmp_path / "out") == report_rows(tmp_path / "ref"), f"killed after rename {n}"
    for rid in ("mlp-mnist-diagonal-s0", "mlp-mnist-ar1-s0"):
        run, ref = tmp_path / "out" / "runs" / rid, tmp_path / "ref" / "runs" / rid
        assert metrics(run) == metrics(ref) and same_weights(run / "last.pt", ref / "last.pt")
        assert not temporaries(run)


# --- two processes, one folder -------------------------------------------------------------------------

HOLD = r"""
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\n"); f.flush()
print("locked", flush=True)
time.sleep(300)
"""


def hold_lock(folder):
    """A live process holding ``folder``'s run lock, as a training process does."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(
    data, tmp_path, capsys, rhovae_process
):
    run = tmp_path / "run"
    proc, _ = rhovae_process(tiny(data, run, 400, "--no-pictures"))
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.csv").exists():  # training: the folder is locked
            assert proc.is_alive() and time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.02)
        assert main(tiny(data, run, 400, "--no-pictures", "--resume")) == 2
        line = error_line(capsys.readouterr().err)
        assert line == (
            f"rhovae: error: {run} is in use by another rhovae process (pid {proc.pid}); wait for it or "
            "choose another --run-dir"
        )
    finally:
        proc.kill()  # SIGKILL, at whatever point of its training it is
        finish(proc)
    # the dead process's lock went with it: resume takes the folder over
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert main(tiny(data, run, done + 1, "--no-pictures", "--resume")) == 0
    assert [int(r["epoch"]) for r in metrics(run)] == list(range(1, done + 2))
    assert not temporaries(run)


def test_lock_is_reentrant_for_its_holder_only(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path):  # compare holds it around training, which takes it too
        pass
    holder = hold_lock(tmp_path)
    try:
        with (
            pytest.raises(RunInUse, match=rf"in use by another rhovae process \(pid {holder.pid}\)"),
            RunLock(tmp_path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # a killed holder's lock is taken over
        pass


def test_a_full_disk_does_not_stop_the_lock(tmp_path, monkeypatch):
    real_fdopen, full = os.fdopen, []

    def fdopen(fd, *a, **kw):  # the lock file opens through os.open + os.fdopen (no symlink followed)
        f = real_fdopen(fd, *a, **kw)
        if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(tmp_path / ".lock"):
            full.append(f)
            return _FullFile(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(_FullFile, "fileno", lambda self: self._f.fileno())
    with RunLock(tmp_path):  # the pid it could not write is only for people
        monkeypatch.undo()
        assert full, "the lock file was not opened through the full disk"
        with pytest.raises(RunInUse), open(tmp_path / ".lock", "a+") as f:
            import fcntl

            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUse("held") from None


def test_two_compares_on_one_folder_share_the_grid(data, tmp_path, caplog, capsys):
    exp = toy(data, epochs=1)
    busy = tmp_path / "out" / "runs" / "mlp-mnist-diagonal-s0"
    holder = hold_lock(busy)  # another compare is training this run
    try:
        with caplog.at_level(logging.INFO, logger="rhovae.experiments"):
            report = compare(exp, tmp_path / "out")
        assert f"mlp-mnist-diagonal-s0: {IN_USE}" in caplog.text
        assert [r["posterior"] for r in report_rows(tmp_path / "out")] == ["ar1"]  # what is finished
        assert not (busy / "config.toml").exists()  # the busy run was not touched
        text = io.StringIO()
        print_summary(report, stream=text)
        assert "the report holds 1 of the grid's 2 runs" in text.getvalue()
    finally:
        holder.kill()
        holder.wait()
    compare(exp, tmp_path / "out")  # the holder died: its run is trained now, the other is not redone
    assert [r["posterior"] for r in report_rows(tmp_path / "out")] == ["diagonal", "ar1"]


# --- full and read-only disks --------------------------------------------------------------------------


class _FullFile:
    """A file on a full disk: every write fails with ENOSPC (and there is no descriptor to go around
    it, so Pillow and torch write through ``write``)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class WriteFaults:
    """Records every write under ``root`` (a file opened for writing, a descriptor made a file, a
    folder made) and makes the ``fail_at``-th fail: ``ENOSPC`` at its first write (full disk) or
    ``EROFS`` when it is opened (the file system turned read-only)."""

    def __init__(self, monkeypatch, root, kind, fail_at=None):
        self.root, self.kind, self.fail_at, self.sites = os.path.realpath(root), kind, fail_at, []
        real_open, real_os_open, real_fdopen, real_mkdir = builtins.open, os.open, os.fdopen, os.mkdir

        def site(path):
            """True when this write is the one to fail."""
            path = os.path.realpath(path)
            if not path.startswith(self.root + os.sep):
                return False
            name = Path(path).name
            temporary = _TEMPORARY.match(name)
            self.sites.append(temporary["target"] if temporary else name)
            return len(self.sites) == self.fail_at

        def erofs(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        def fake_open(file, mode="r", *args, **kwargs):
            writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
            if self.kind == "ENOSPC" and writing and Path(file).name == ".lock":
                writing = False  # flock needs its descriptor; the pid it writes is tested on its own
            if writing and site(file):
                if self.kind == "EROFS":
                    erofs(file)
                return _FullFile(real_open(file, mode, *args, **kwargs))
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if self.kind == "EROFS" and writing and site(path):
                erofs(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            if Path(os.path.realpath(f"/proc/self/fd/{fd}")).name == ".lock":
                return f  # as in fake_open: flock needs its descriptor
            if self.kind == "ENOSPC" and any(c in mode for c in "wax+") and site(f"/proc/self/fd/{fd}"):
                return _FullFile(f)
            return f

        def fake_mkdir(path, *args, **kwargs):
            if self.kind == "EROFS" and not os.path.exists(path) and site(path):
                erofs(path)
            return real_mkdir(path, *args, **kwargs)

        for module, name, fake in ((builtins, "open", fake_open), (io, "open", fake_open),
                                   (os, "open", fake_os_open), (os, "fdopen", fake_fdopen),
                                   (os, "mkdir", fake_mkdir)):  # fmt: skip
            monkeypatch.setattr(module, name, fake)


# runs.py says it in words; plots.py (the pictures) still passes the system's text on
REASON = {
    "ENOSPC": ("the disk is full", "No space left on device"),
    "EROFS": ("the file system is read-only", "Read-only file system"),
}


def says(line, kind):
    return any(reason in line for reason in REASON[kind])


@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS"])
def test_every_write_of_an_epoch_on_a_full_or_read_only_disk(data, reference, tmp_path, kind, capsys):
    """Epoch 2 of a resumed run with pictures: each of its writes fails in turn. Every time: one line,
    exit 2, no temporary file, last.pt either the old one (intact) or the new one (complete); and then
    --resume finishes the run exactly as if nothing had happened."""
    ref, _ = reference
    base = tmp_path / "base"
    assert main(tiny(data, base, 1)) == 0
    before = (base / "last.pt").read_bytes()
    shutil.copytree(base, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:
        count = WriteFaults(mp, tmp_path / "count", kind)
        assert main(tiny(data, tmp_path / "count", 2, "--resume")) == 0
    assert {"config.toml", "last.pt", "metrics.csv", "samples.png", "loss_curves.png"} <= set(count.sites)
    capsys.readouterr()
    for k, name in enumerate(count.sites, 1):
        run = tmp_path / f"fail{k}"
        shutil.copytree(base, run)
        with pytest.MonkeyPatch.context() as mp:
            WriteFaults(mp, run, kind, fail_at=k)
            rc = main(tiny(data, run, 2, "--resume"))
        err = capsys.readouterr().err
        where = f"{kind} at write {k} ({name})"
        assert rc == 2, where
        line = error_line(err)
        assert says(line, kind) and str(run) in line, (where, line)
        assert not temporaries(run), where
        last = (run / "last.pt").read_bytes()
        assert last == before or load_checkpoint(run / "last.pt", resume=True)["epoch"] == 2, where
        if k % 3 == 1 or name in ("last.pt", "metrics.csv"):  # and nothing is lost (a seeded third)
            assert main(tiny(data, run, 3, "--resume")) == 0, where
            assert metrics(run) == metrics(ref), where
            assert same_weights(run / "last.pt", ref / "last.pt"), where
        capsys.readouterr()


def test_evaluate_prints_everything_before_it_fails_to_write(data, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    WriteFaults(monkeypatch, run, "ENOSPC", fail_at=1)
    assert main(["-q", "evaluate", str(run), "--iwae-k", "3", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "test negative ELBO" in out and "IWAE NLL (k=3)" in out and "active units" in out
    assert error_line(err) == (
        f"rhovae: error: cannot write {run / 'evaluation.json'}: the disk is full; free space or choose "
        "a writable --run-dir (the figures above are complete)"
    )
    assert not (run / "evaluation.json").exists() and not temporaries(run)


@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS"])
@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--iwae-k", "2", "--limit", "10"],
        ["sample", "-n", "4"],
        ["reconstruct", "-n", "4"],
        ["explore", "--out", "{run}/explore"],
    ],
    ids=lambda c: c[0],
)
def test_every_write_of_the_reading_commands(reference, tmp_path, kind, command, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, ignore=shutil.ignore_patterns("explore"))
    argv = ["-q", command[0], str(run), *(a.format(run=run) for a in command[1:]), "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        count = WriteFaults(mp, run, kind)
        assert main(argv) == 0
    capsys.readouterr()
    assert count.sites
    for k, name in enumerate(count.sites, 1):
        shutil.rmtree(run / "explore", ignore_errors=True)  # the same writes each time, folder included
        with pytest.MonkeyPatch.context() as mp:
            WriteFaults(mp, run, kind, fail_at=k)
            assert main(argv) == 2, f"{kind} at write {k} ({name})"
        line = error_line(capsys.readouterr().err)
        assert str(run) in line and says(line, kind), line
        assert not temporaries(run)
        assert load_checkpoint(run / "best.pt")["epoch"] == 3  # a reading command never harms the run


@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS"])
def test_every_write_of_compare_fails_in_one_line(data, tmp_path, kind, capsys):
    """A finished grid whose runs still need their evaluation: experiment.json, the lock, config.toml,
    evaluation.json and every report file fail in turn."""
    exp = tmp_path / "toy.toml"
    toy_toml(data, exp)
    done = tmp_path / "done"
    compare(load_experiment(exp), done)
    for p in done.glob("runs/*/evaluation.json"):
        p.unlink()
    argv = ["-q", "compare", str(exp), "--out"]
    shutil.copytree(done, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:
        count = WriteFaults(mp, tmp_path / "count", kind)
        assert main([*argv, str(tmp_path / "count")]) == 0
    capsys.readouterr()
    assert {"experiment.json", "evaluation.json", "report.json", "runs.csv", "report.md"} <= set(count.sites)
    for k, name in enumerate(count.sites, 1):
        out = tmp_path / f"fail{k}"
        shutil.copytree(done, out)
        with pytest.MonkeyPatch.context() as mp:
            WriteFaults(mp, out, kind, fail_at=k)
            rc = main([*argv, str(out)])
        err = capsys.readouterr().err
        assert rc == 2, f"{kind} at write {k} ({name})"
        error_line(err)
        assert not temporaries(out)
        if k % 2 or name in ("evaluation.json", "report.json"):  # and the next compare completes it
            assert main([*argv, str(out)]) == 0
            assert len(report_rows(out)) == 2
        capsys.readouterr()


def _mount(*args):
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs (root only), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = _mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_and_a_read_only_one(data, reference, small_disk, capsys):
    ref, _ = reference
    run = small_disk / "run"
    filler = small_disk / "filler"
    for free_kib in (16, 96, 160):  # the disk fills at another write each time
        shutil.rmtree(run, ignore_errors=True)
        filler.write_bytes(b"")
        stat = os.statvfs(small_disk)
        filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free_kib * 1024))
        assert main(tiny(data, run, 3)) == 2
        line = error_line(capsys.readouterr().err)
        assert "the disk is full" in line or "No space left" in line, line
        assert not temporaries(small_disk)
        filler.unlink()
        resume = ["--resume"] if (run / "last.pt").exists() else []
        assert main(tiny(data, run, 3, *resume)) == 0, capsys.readouterr().err
        assert metrics(run) == metrics(ref) and same_weights(run / "last.pt", ref / "last.pt")
    assert _mount("-o", "remount,ro", str(small_disk)).returncode == 0
    assert main(tiny(data, run, 4, "--resume")) == 2
    assert "read-only" in error_line(capsys.readouterr().err)
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


# --- inputs that must fail in one line -----------------------------------------------------------------


def run_cli(argv, capsys, monkeypatch=None, cwd=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "meta"], "device 'meta' cannot train a model"),
        (["--device", "mps"], "device 'mps' requested but MPS is not available"),
        (["--device", "cuda:7"], "device 'cuda:7'"),
        (["--seed", str(2**64)], "seed is out of range: 18446744073709551616"),
        (["--seed", "-1"], "seed must be >= 0"),
    ],
)
def test_impossible_train_settings(data, tmp_path, capsys, argv, message):
    if argv[1] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if argv[1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    rc, _, err = run_cli(tiny(data, tmp_path / "run", 1, *argv), capsys)
    assert rc == 2 and message in error_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{run}", "--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
        (["evaluate", "{run}", "--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
        (["explore", "{run}", "--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
        (["sample", "{run}", "-n", "4097"], "-n must be between 1 and 4096"),
        (["reconstruct", "{run}", "-n", "0"], "-n must be between 1 and 4096"),
        (["sample", "{run}", "--temperature", "nan"], "--temperature must be a finite number"),
        (["sample", "{run}", "--device", "meta"], "device 'meta' cannot train a model"),
        (["evaluate", "{run}", "--iwae-k", "0"], "--iwae-k must be positive"),
        (["evaluate", "{run}/best.pt"], "no such run folder"),
        (["train", "--config", "{run}"], "is a folder; give a TOML file"),
        (["train", "--config", "{run}/last.pt"], "not UTF-8 text"),
    ],
)
def test_impossible_requests_to_a_run(reference, capsys, argv, message):
    run = reference[0]
    rc, out, err = run_cli([a.format(run=run) for a in argv], capsys)
    assert rc == 2 and message in error_line(err) and not out


def test_configs_nested_too_deeply(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("grid = " + "[" * 100_000)
    rc, _, err = run_cli(["train", "--config", str(deep)], capsys)
    assert rc == 2 and "nested too deeply" in error_line(err)
    rc, _, err = run_cli(["compare", str(deep)], capsys)
    assert rc == 2 and "nested too deeply" in error_line(err)


def test_resume_with_fewer_epochs_or_another_runs_checkpoint(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    rc, _, err = run_cli(tiny(data, run, 2, "--resume"), capsys)
    assert rc == 2 and "has already trained 3 epochs; --epochs must be at least that" in error_line(err)
    # another run's checkpoint (other sizes) in this folder
    other = tmp_path / "other"
    assert main(tiny(data, other, 1, "--latent-dim", "5", "--no-pictures")) == 0
    shutil.copy(other / "last.pt", run / "last.pt")
    rc, _, err = run_cli(tiny(data, run, 4, "--resume"), capsys)
    assert rc == 2 and "belongs to another run than" in error_line(err)
    # the same config, but weights of other sizes (a hand-made or damaged file)
    ckpt = torch.load(other / "last.pt", weights_only=True)
    ckpt["config"] = torch.load(reference[0] / "last.pt", weights_only=True)["config"]
    torch.save(ckpt, run / "last.pt")
    rc, _, err = run_cli(tiny(data, run, 4, "--resume"), capsys)
    assert rc == 2 and "last.pt does not fit this run: " in error_line(err)


@pytest.mark.parametrize("entry", ["data_shape", "rng", "model", "epoch"])
@pytest.mark.parametrize("damage", ["missing", "wrong type"])
def test_a_checkpoint_lacking_an_entry(data, reference, tmp_path, capsys, entry, damage):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        if damage == "missing":
            ckpt.pop(entry, None)
        else:
            ckpt[entry] = "?"
        torch.save(ckpt, run / name)
    said = f"checkpoint lacks {entry}" if damage == "missing" else f"checkpoint entry {entry} is damaged"
    if entry != "rng":  # what reading a run needs (best.pt has no random state)
        rc, _, err = run_cli(["-q", "sample", str(run), "-n", "2", "--device", "cpu"], capsys)
        assert rc == 2 and f"best.pt: {said}" in error_line(err)
    rc, _, err = run_cli(tiny(data, run, 4, "--resume"), capsys)
    assert rc == 2 and f"last.pt: {said}" in error_line(err)


def test_the_cli_keeps_its_promise_for_unexpected_errors(monkeypatch, capsys):
    def raises(error):
        def command(args):
            raise error

        return command

    monkeypatch.setitem(cli.COMMANDS, "sample", raises(OSError(errno.EIO, "Input/output error", "/x/y.pt")))
    assert main(["sample", "r"]) == 2
    assert error_line(capsys.readouterr().err) == "rhovae: error: /x/y.pt: Input/output error"
    monkeypatch.setitem(cli.COMMANDS, "sample", raises(RhovaeError("a\nb")))
    assert main(["sample", "r"]) == 2 and error_line(capsys.readouterr().err) == "rhovae: error: a b"
    monkeypatch.setitem(cli.COMMANDS, "sample", raises(MemoryError()))
    assert main(["sample", "r"]) == 2 and "out of memory" in error_line(capsys.readouterr().err)
    monkeypatch.setitem(cli.COMMANDS, "sample", raises(ZeroDivisionError("bug")))
    assert main(["sample", "r"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: bug" in err
    assert err.strip().splitlines()[-1].startswith("rhovae: internal error (a bug, not your input)")


def test_an_explicit_data_dir_is_used_or_fails(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RHOVAE_DATA", str(data))  # the data is there, but not where the flag says
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(tiny(empty, tmp_path / "run", 1), capsys)
    assert rc == 2 and f"--data-dir {empty}: no mnist dataset there" in error_line(err)


def test_damaged_idx_files(tmp_path):
    labels = np.arange(50, dtype=np.uint8)
    write_idx(tmp_path / "ok.gz", labels)
    packed = gzip.compress(bytes([0, 0, 8, 1]) + (50).to_bytes(4, "big") + labels.tobytes())
    bad = bytearray(packed)
    bad[10] ^= 0xFF  # the first byte of the deflate stream: an invalid block type
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(bad))
    cases = {
        "deflate.gz": bytes(bad),
        "truncated.gz": packed[:-9],
        "rank255": bytes([0, 0, 8, 255]) + (1).to_bytes(4, "big") * 255,
        "rank255-empty": bytes([0, 0, 8, 255]) + bytes(4 * 255),
        "rank0": bytes([0, 0, 8, 0]),
        "overflow": bytes([0, 0, 8, 4]) + (2**32 - 1).to_bytes(4, "big") * 4 + b"x",
        "empty-huge": bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 2 + bytes(4),
        "big-claim": bytes([0, 0, 8, 2]) + (2**20).to_bytes(4, "big") * 2 + b"xy",  # 1 TiB claimed
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(RhovaeError) as e:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), labels)


def test_non_square_idx_images_train_and_draw(tmp_path, capsys):
    d = tmp_path / "idx"
    write_idx_dataset(d, n_train=200, n_test=50)
    wide = make_images(250, 56, 0)[:, 21:35, :]  # 14 x 56
    write_idx(d / "train-images-idx3-ubyte", wide[:200])
    write_idx(d / "t10k-images-idx3-ubyte", wide[200:])
    run = tmp_path / "run"
    assert main([*tiny(d, run, 1), "--val-size", "20"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["data_shape"] == [1, 14, 56]
    assert main(["-q", "reconstruct", str(run), "-n", "4", "--device", "cpu"]) == 0
    assert main(["-q", "sample", str(run), "-n", "4", "--device", "cpu"]) == 0
    assert main(["-q", "evaluate", str(run), "--iwae-k", "2", "--device", "cpu"]) == 0


def test_report_only_with_a_truncated_evaluation(data, tmp_path, caplog, capsys):
    exp = toy(data, epochs=1)
    compare(exp, tmp_path / "out")
    damaged = tmp_path / "out" / "runs" / "mlp-mnist-ar1-s0" / "evaluation.json"
    damaged.write_text(damaged.read_text()[:50])
    with caplog.at_level(logging.WARNING):
        report = write_report(exp, tmp_path / "out")
    assert "not complete JSON" in caplog.text and "left out of the report" in caplog.text
    assert [r["posterior"] for r in report_rows(tmp_path / "out")] == ["diagonal"]
    damaged.write_bytes(b"\xff\xfe")
    write_report(exp, tmp_path / "out")
    text = io.StringIO()
    print_summary(report, stream=text)
    assert "holds 1 of the grid's 2 runs" in text.getvalue()
    (tmp_path / "out" / "report.json").write_text('{"summary": [')
    with pytest.raises(RhovaeError, match="unreadable report"):
        print_summary(report)
    # and through the command line: a warning, the report of the finished run, exit 0
    toml = toy_toml(data, tmp_path / "toy.toml", epochs=1)
    assert main(["-q", "compare", str(toml), "--out", str(tmp_path / "out"), "--report-only"]) == 0
    # compare itself evaluates the damaged run again
    assert main(["-q", "compare", str(toml), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(damaged.read_text())["iwae_k"] == 5
    assert len(report_rows(tmp_path / "out")) == 2


class _Payload:
    """What a malicious checkpoint pickles: unpickling it would create a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_never_runs_code(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    torch.save({**ckpt, "extra": _Payload(tmp_path / "pwned")}, run / "best.pt")
    rc, _, err = run_cli(["-q", "sample", str(run), "-n", "2", "--device", "cpu"], capsys)
    assert rc == 2 and "unreadable checkpoint (UnpicklingError); it may be corrupt" in error_line(err)
    assert not (tmp_path / "pwned").exists()


def test_two_writers_of_one_file_never_tear_it(tmp_path):
    """Atomic writes with unique temporary names: writers racing on one path leave one whole version,
    and a reader in between sees a whole version too."""
    path = tmp_path / "metrics.csv"
    versions = {c * 50_000 for c in "ab"}
    seen = []

    def writer(text):
        for _ in range(10):
            write_text_atomic(path, text)

    threads = [threading.Thread(target=writer, args=(text,)) for text in versions]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if path.exists():
            seen.append(path.read_text())
    for t in threads:
        t.join()
    assert set(seen) <= versions and path.read_text() in versions
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_run_files_are_readable_like_any_new_file(reference):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.toml", "metrics.csv", "last.pt", "best.pt"):
        assert (reference[0] / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
