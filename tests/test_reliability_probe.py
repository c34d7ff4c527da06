"""The defects an independent probe found in rhovae (reliability, round two), one test or more each, in
the probe's order: data loss, hangs and crashes, misleading behaviour, and the smaller findings. Each
test fails on the code before its fix. docs/reliability.md lists the promise each one proves.
"""

import contextlib
import csv
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_experiment, write_idx_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

import rhovae
from rhovae.cli import main
from rhovae.config import SIZE_LIMITS, RunConfig, from_dict, load_config, to_toml, tomllib
from rhovae.data import batch_bounds, read_idx
from rhovae.errors import RhovaeError
from rhovae.experiments import MAX_GRID_POINTS, compare, file_label, load_experiment, write_report
from rhovae.runs import _TEMPORARY, RunLock, temporary_beside
from rhovae.train import TrainingDiverged


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny IDX dataset of conftest (400 train / 100 test images of 12x12), shared by the module."""
    return write_idx_dataset(tmp_path_factory.mktemp("data") / "idx")


def tiny(data, run, epochs=1, *extra):
    return [
        "-q", "train", "--dataset", "mnist", "--data-dir", str(data), "--val-size", "100",
        "--latent-dim", "3", "--hidden", "16", "--batch-size", "100", "--epochs", str(epochs),
        "--device", "cpu", "--run-dir", str(run), "--no-progress", "--no-pictures", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run (pictures on), read-only to the tests that use it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*tiny(data, run)[:-1], "--pictures"]) == 0
    return run


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rhovae: error: "), err
    return lines[0]


@contextlib.contextmanager
def within(seconds: int):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- 1-5: data loss -----------------------------------------------------------------------------------


def test_1_a_lock_that_is_a_symlink_or_a_fifo_is_never_followed(data, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "runs" / "lk"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(Path("../../victim.txt"))
    assert main(tiny(data, run, 1, "--resume")) == 2
    assert "symbolic link" in one_line(capsys.readouterr().err)
    assert main(tiny(data, run)) == 2
    capsys.readouterr()
    assert victim.read_text() == "precious\n"  # neither truncated nor given a pid
    fifo_run = tmp_path / "fifo"
    fifo_run.mkdir()
    os.mkfifo(fifo_run / ".lock")
    with within(30), pytest.raises(RhovaeError, match="not a regular file"):
        with RunLock(fifo_run):
            pass


def test_2_a_folder_that_is_not_a_run_is_never_touched(data, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [".backup.20240101.tmp", ".photo.portrait.png", ".notes.txt.abcdefgh.txt", "holiday.jpg"]
    for name in names:
        (folder / name).write_text(name)
    assert main(tiny(data, folder)) == 2
    assert "holds no rhovae run" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no file removed, no .lock left
    # temporary names are ones only rhovae makes: none of a user's hidden files matches them
    assert not any(_TEMPORARY.match(n) for n in names)
    for suffix in (".tmp", ".png", ".txt"):
        fd, name = temporary_beside(tmp_path / "samples.txt", suffix)
        os.close(fd)
        assert _TEMPORARY.match(Path(name).name), name


def test_3_a_run_whose_last_pt_was_deleted_is_not_overwritten(data, tmp_path, capsys):
    run = tmp_path / "x"
    assert main(tiny(data, run)) == 0
    (run / "last.pt").unlink()
    best, config = (run / "best.pt").read_bytes(), (run / "config.toml").read_text()
    assert main([*tiny(data, run), "--seed", "5", "--latent-dim", "2"]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert (run / "best.pt").read_bytes() == best and (run / "config.toml").read_text() == config
    assert main([*tiny(data, run), "--seed", "5", "--latent-dim", "2", "--overwrite"]) == 0
    assert load_config(run / "config.toml").latent_dim == 2
    assert main([*tiny(data, run), "--resume", "--overwrite"]) == 2  # one or the other
    capsys.readouterr()


def test_4_a_kill_between_last_pt_and_the_epochs_other_records_is_completed_by_resume(
    data, tmp_path, monkeypatch
):
    import rhovae.train as train_module

    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(tiny(data, reference, 2)) == 0
    real = train_module._write_epoch_records

    def killed_at_epoch_2(r, write_best):
        if r.state.epoch == 2:
            raise KeyboardInterrupt  # as a kill right after epoch 2's last.pt landed
        real(r, write_best)

    monkeypatch.setattr(train_module, "_write_epoch_records", killed_at_epoch_2)
    assert main(tiny(data, run, 2)) == 130
    monkeypatch.setattr(train_module, "_write_epoch_records", real)
    with open(run / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]  # the record the kill cost
    assert main(tiny(data, run, 2, "--resume")) == 0  # trains nothing, completes the records
    for name in ("metrics.csv",):
        with open(run / name) as f, open(reference / name) as g:
            drop = ("epoch_seconds", "samples_per_second")
            rows = [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]
            assert rows == [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(g)]
    a, b = (torch.load(p / "best.pt", weights_only=True) for p in (run, reference))
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_5_every_text_setting_round_trips_through_config_toml(text):
    cfg = from_dict({"data_dir": text, "dataset": "npz:" + text})
    assert from_dict(tomllib.loads(to_toml(cfg))).to_dict() == cfg.to_dict()


def test_5_a_data_path_with_a_newline_trains_and_is_evaluated(data, tmp_path):
    odd = tmp_path / "my\ndata\t\x01"
    write_idx_dataset(odd)
    run = tmp_path / "run"
    assert main(tiny(odd, run)) == 0
    assert load_config(run / "config.toml").data_dir == str(odd)
    assert main(["-q", "evaluate", str(run), "--iwae-k", "2", "--limit", "10", "--device", "cpu"]) == 0


# --- 6-16: hangs, leaks, crashes -----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has died (only its parent has not reaped it)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_6_compare_workers_die_with_their_parent(data, tmp_path):
    """SIGKILL and SIGTERM of `compare --jobs 2` (the two at once): no worker outlives its parent."""
    script = textwrap.dedent(
        """
        import sys
        from conftest import toy_experiment
        from rhovae.experiments import compare
        compare(toy_experiment(sys.argv[1], seeds=(0, 1), epochs=200), sys.argv[2], jobs=2)
        """
    )
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    procs = {
        sig: subprocess.Popen([sys.executable, "-c", script, str(data), str(tmp_path / sig.name)], env=env)
        for sig in (signal.SIGKILL, signal.SIGTERM)
    }
    try:
        workers = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(len(workers.get(s, [])) < 2 for s in procs):
            for sig, proc in procs.items():
                # the spawned workers (the resource tracker is a child too, and dies on its own)
                workers[sig] = [c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)]
            time.sleep(0.5)
        assert all(len(w) == 2 for w in workers.values()), workers
        # both workers training (a worker that waits for a task sees its pipe close and ends anyway)
        while time.monotonic() < deadline and not all(
            len(list((tmp_path / sig.name / "runs").glob("*/config.toml"))) >= 2 for sig in procs
        ):
            time.sleep(0.5)
        time.sleep(1)
        for sig, proc in procs.items():
            proc.send_signal(sig)
            proc.wait(30)
        deadline = time.monotonic() + 30
        left = [w for ws in workers.values() for w in ws]
        while left and time.monotonic() < deadline:
            left = [w for w in left if _alive(w)]
            time.sleep(0.2)
        assert not left, f"workers {left} outlived their parent"
    finally:
        for proc in procs.values():
            proc.kill()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_7_a_fifo_where_rhovae_reads_a_file_is_refused(finished, data, tmp_path, capsys):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with within(60):
        assert main(["train", "--config", str(fifo)]) == 2
        assert "not a regular file" in one_line(capsys.readouterr().err)
        run = tmp_path / "run"
        run.mkdir()
        for name in ("config.toml", "metrics.csv"):
            (run / name).write_bytes((finished / name).read_bytes())
        os.mkfifo(run / "best.pt")
        assert main(["evaluate", str(run), "--iwae-k", "2", "--device", "cpu"]) == 2
        assert "not a regular file" in one_line(capsys.readouterr().err)
        assert main(["compare", str(fifo)]) == 2
        assert "not a regular file" in one_line(capsys.readouterr().err)
        exp = toy_experiment(data)
        rid = exp.configs()[0][0]
        (tmp_path / "out" / "runs" / rid).mkdir(parents=True)
        os.mkfifo(tmp_path / "out" / "runs" / rid / "evaluation.json")
        with pytest.raises(RhovaeError, match="no finished runs"):  # left out with a warning, no hang
            write_report(exp, tmp_path / "out")


def test_8_a_huge_grid_is_refused_before_it_is_expanded(tmp_path):
    values = ", ".join(str(i) for i in range(1000))
    path = tmp_path / "huge.toml"
    path.write_text(f"[grid]\nseed = [{values}]\nlimit = [{values}]\nval_size = [{values}]\n")
    start = time.perf_counter()
    with pytest.raises(RhovaeError, match=f"spans 1,000,000,000 runs, more than the {MAX_GRID_POINTS:,}"):
        load_experiment(path)
    assert time.perf_counter() - start < 30  # generous: the old code ran for minutes and GBs


def test_9_an_idx_gz_whose_header_claims_more_than_it_holds(tmp_path, monkeypatch):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2**16, 2**10, 2**10))  # 64 GiB
    path.write_bytes(gzip.compress(header + bytes(2**22)))  # 4 MiB of real data
    tracemalloc.start()
    try:
        with pytest.raises(RhovaeError, match="truncated") as e:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a file of 4 MiB of data"
    assert "batch" not in str(e.value)
    # data that really is larger than the machine's memory is named as such, before it is allocated
    import rhovae.data.idx as idx

    monkeypatch.setattr(idx, "_physical_memory", lambda: 2**20)
    plain = tmp_path / "big-idx3-ubyte"
    idx.write_idx(plain, np.zeros((4, 512, 1024), dtype=np.uint8))  # 2 MiB
    with pytest.raises(RhovaeError, match="more than this machine's"):
        read_idx(plain)


def test_10_a_memory_mapped_npy_cut_short_while_training_is_an_error_not_a_sigbus(tmp_path):
    """Run in a process of its own: on the old code the read kills the process with SIGBUS."""
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).random((3000, 784), dtype=np.float32))  # 9.4 MB
    script = textwrap.dedent(
        f"""
        import os, torch
        from rhovae.data import load_data, ArraySplit
        from rhovae.errors import RhovaeError
        data = load_data("npz:{path}", pixels="continuous", in_memory_limit_mb=1, unit_interval="")
        assert isinstance(data.train, ArraySplit), data.train
        first = data.train[torch.arange(100)]
        os.truncate("{path}", 4096)
        try:
            data.train[torch.arange(len(data.train))]
        except RhovaeError as e:
            print("ERROR", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ERROR" in proc.stdout and "cut short" in proc.stdout, proc.stdout


def test_11_infovae_trains_when_the_last_batch_would_hold_one_example(data, tmp_path):
    # 301 training examples in batches of 100: the last batch would hold one (BatchNorm, MMD)
    argv = tiny(data, tmp_path / "run", 1, "--model", "infovae")
    argv[argv.index("--val-size") + 1] = "99"
    assert main(argv) == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 300))
def test_11_batches_cover_the_epoch_and_none_holds_one_example(n, batch_size):
    bounds = batch_bounds(n, batch_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(0 < e - s <= batch_size for s, e in bounds)
    assert len(bounds) == math.ceil(n / batch_size)
    if n > 1 and batch_size > 2:
        assert all(e - s > 1 for s, e in bounds)


def test_12_a_zero_width_array_is_one_line(tmp_path, capsys):
    with pytest.raises(RhovaeError, match="hold no values"):
        rhovae.fit(data=np.zeros((10, 0), dtype=np.float32), epochs=1, run_dir=tmp_path / "a")
    np.savez(tmp_path / "zero.npz", train=np.zeros((10, 0), dtype=np.float32))
    assert main(["train", "--dataset", f"npz:{tmp_path / 'zero.npz'}", "--run-dir", str(tmp_path / "b")]) == 2
    assert "hold no values" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", sorted(SIZE_LIMITS))
def test_13_every_size_setting_is_bounded(name):
    cfg = from_dict({name: SIZE_LIMITS[name] + 1})
    with pytest.raises(RhovaeError, match=f"{name.replace('_', '-')} must be at most"):
        cfg.validate()


def test_13_an_absurd_latent_dim_is_one_line(capsys):
    assert main(["train", "--latent-dim", "9223372036854775807"]) == 2
    assert "latent-dim must be at most" in one_line(capsys.readouterr().err)


def test_14_sample_and_reconstruct_write_only_files_of_their_kind(finished, capsys):
    best = (finished / "best.pt").read_bytes()
    for out in (finished, finished / "x.txt", finished / "noext", finished / "best.pt"):
        for command in ("sample", "reconstruct"):
            assert main([command, str(finished), "--device", "cpu", "--out", str(out)]) == 2, out
            one_line(capsys.readouterr().err)
    assert (finished / "best.pt").read_bytes() == best


def test_14_a_vector_run_never_samples_over_its_own_checkpoint(tmp_path, capsys):
    x = np.random.default_rng(0).random((300, 6)).astype(np.float32)
    _, run = rhovae.fit(data=x, likelihood="gaussian", epochs=1, latent_dim=2, run_dir=tmp_path / "v")
    best = (run / "best.pt").read_bytes()
    np.savez(tmp_path / "v.npz", train=x)
    assert main(["sample", str(run), "--device", "cpu", "--out", str(run / "best.pt")]) == 2
    assert "own record" in one_line(capsys.readouterr().err)
    assert (run / "best.pt").read_bytes() == best


def test_15_the_python_api_raises_rhovae_errors_for_users_mistakes(finished, tmp_path):
    class Labelled(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.rand(5), "cat"

    with pytest.raises(RhovaeError, match="not an integer"):
        rhovae.fit(data=Labelled(), epochs=1, run_dir=tmp_path / "r")
    model = rhovae.load(finished, device="cpu")
    for n in (-1, 0, 2.5, "3", True):
        with pytest.raises(RhovaeError, match="positive whole number"):
            model.sample(n)
    assert model.sample(np.int64(2)).shape[0] == 2


def test_16_temporary_files_of_every_writer_are_swept_by_the_next_lock_holder(finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "metrics.csv"):
        (run / name).write_bytes((finished / name).read_bytes())
    left = []
    for target, suffix in (("samples.txt", ".txt"), ("samples.png", ".png"), ("last.pt", ".tmp")):
        fd, name = temporary_beside(run / target, suffix)
        os.close(fd)
        left.append(Path(name))
    with RunLock(run):
        pass
    assert not any(p.exists() for p in left)


# --- 17-19: misleading --------------------------------------------------------------------------------


def test_17_grid_values_with_slashes_make_a_report(data, tmp_path):
    exp = toy_experiment(data, epochs=1)
    exp.grid = {"data_dir": [str(data)], **exp.grid}
    del exp.run["data_dir"]
    report = compare(exp, tmp_path / "out")
    assert report.exists()
    assert write_report(exp, tmp_path / "out").exists()  # --report-only too
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert any(n.startswith("curves-") and "/" not in n for n in names)


def test_17_file_labels_are_safe_and_distinct():
    assert file_label("a/b:c d") == "a_b_c_d"
    assert file_label("..") == "_" and file_label("") == "_"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(file_label(long_a)) <= 120 and file_label(long_a) != file_label(long_b)


def test_18_a_nan_validation_loss_is_named_as_a_divergence(tmp_path, monkeypatch):
    import rhovae.train as train_module

    real = train_module.elbo_terms

    def nan_on_evaluation(model, split, **kw):  # finite training steps, a NaN evaluation
        return {**real(model, split, **kw), "loss": math.nan}

    monkeypatch.setattr(train_module, "elbo_terms", nan_on_evaluation)
    x = np.random.default_rng(0).random((300, 6)).astype(np.float32)
    with pytest.raises(TrainingDiverged, match="the validation loss is nan"):
        rhovae.fit(data=x, likelihood="gaussian", epochs=1, latent_dim=2, run_dir=tmp_path / "r")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--latent-dim", "abc"],
        ["train", "--lr", "fast"],
        ["train", "--posterior"],
        ["compare", "--preset", "nope"],
        ["evaluate"],
        ["nosuchcommand"],
        ["sample", "x", "--checkpoint", "middle"],
    ],
)
def test_19_flags_of_a_wrong_type_or_choice_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "--help" in one_line(capsys.readouterr().err)


# --- also worth doing ---------------------------------------------------------------------------------


def test_evaluation_json_is_strict_json(finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for p in finished.iterdir():
        if p.is_file():
            (run / p.name).write_bytes(p.read_bytes())
    assert main(["-q", "evaluate", str(run), "--iwae-k", "2", "--limit", "10", "--device", "cpu"]) == 0

    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")

    json.loads((run / "evaluation.json").read_text(), parse_constant=refuse)
    from rhovae.files import strict_json

    assert json.loads(strict_json({"a": [math.nan, math.inf, 1.5]})) == {"a": [None, None, 1.5]}


def test_a_setting_spelled_twice_and_a_byte_order_mark(tmp_path):
    with pytest.raises(RhovaeError, match="name one setting"):
        from_dict({"latent-dim": 2, "latent_dim": 3})
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufefflatent_dim = 4\n".encode())
    assert load_config(path).latent_dim == 4
    twice = tmp_path / "twice.toml"
    twice.write_text("latent-dim = 2\nlatent_dim = 3\n")
    with pytest.raises(RhovaeError, match="name one setting"):
        load_config(twice)


def test_fit_resumes_only_on_the_data_it_was_trained_on(tmp_path):
    rng = np.random.default_rng(0)
    x, other = (rng.random((300, 6)).astype(np.float32) for _ in range(2))
    settings_ = dict(likelihood="gaussian", latent_dim=2, run_dir=tmp_path / "r")
    rhovae.fit(data=x, epochs=1, **settings_)
    with pytest.raises(RhovaeError, match="other data"):
        rhovae.fit(data=other, epochs=2, resume=True, **settings_)
    rhovae.fit(data=x, epochs=2, resume=True, **settings_)  # the same data resumes


def test_run_config_defaults_are_within_their_bounds():
    cfg = RunConfig()
    assert all(getattr(cfg, name) <= most for name, most in SIZE_LIMITS.items())


def test_a_users_config_toml_does_not_make_a_folder_a_run(data, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.toml").write_text("[tool]\nname = 'mine'\n")
    (folder / "metrics.csv").write_text("a,b\n1,2\n")
    for extra in ((), ("--overwrite",)):
        assert main([*tiny(data, folder), *extra]) == 2
        assert "holds no rhovae run" in one_line(capsys.readouterr().err)
    assert (folder / "config.toml").read_text() == "[tool]\nname = 'mine'\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml", "metrics.csv"]


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(data, tmp_path, capsys):
    run = tmp_path / "x"
    assert main(tiny(data, run)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    # a sequence model on image data is refused when the model is built, after the data loaded
    assert main([*tiny(data, run), "--model", "lstm", "--overwrite"]) == 2
    one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_an_mlflow_server_that_fails_is_one_line(data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    import rhovae.trackers as trackers

    class Down:  # every call fails as against a server that is not there
        def __getattr__(self, name):
            def refused(*args, **kwargs):
                raise ConnectionError("Connection refused")

            return refused

    monkeypatch.setattr(trackers, "_client", lambda uri: Down())
    assert main([*tiny(data, tmp_path / "r"), "--mlflow", "http://127.0.0.1:9"]) == 2
    assert "MLflow at http://127.0.0.1:9: Connection refused" in one_line(capsys.readouterr().err)
