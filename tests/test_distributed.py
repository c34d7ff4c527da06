"""One run on several processes: DDP under torchrun (two CPU processes, gloo) gives one process's
numbers; a dying rank stops the job and ``--resume`` continues it; the sharding and loss weighting
behind it; bf16 autocast and torch.compile."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_idx_dataset
from torch.distributions import kl_divergence

from rhovae.config import RunConfig
from rhovae.data import Data
from rhovae.data.core import shard_bounds
from rhovae.distributions import AR1Normal, StandardNormal
from rhovae.errors import RhovaeError
from rhovae.runs import load_checkpoint
from rhovae.train import train

TIMEOUT = 240  # seconds for one torchrun job (about 15 s here)

# Runs rhovae's CLI for each job under torchrun and prints every job's exit status. A job with
# "mean_sample" replaces the AR(1) posterior's sample by its mean: each rank draws its own noise, so only
# without noise can two processes match one. FAIL_RANK_EPOCH=R:E makes rank R raise when epoch E starts.
DRIVER = """
import json, os, sys
import rhovae.train
from rhovae.cli import main
from rhovae.distributions import AR1Normal

sample = AR1Normal.rsample
if os.environ.get("FAIL_RANK_EPOCH"):
    rank, epoch = map(int, os.environ["FAIL_RANK_EPOCH"].split(":"))
    original = rhovae.train.train_epoch

    def failing(run, e):
        if e == epoch and int(os.environ["RANK"]) == rank:
            raise RuntimeError(f"simulated crash of rank {rank}")
        return original(run, e)

    rhovae.train.train_epoch = failing
codes = []
for job in json.loads(sys.argv[1]):
    AR1Normal.rsample = sample
    if job.get("mean_sample"):
        AR1Normal.rsample = lambda self, shape=(): self.loc.expand(self._extended_shape(shape))
    codes.append(main(job["argv"]))
print("exit codes", json.dumps(codes))
# DDP imports torch.distributed.nn.functional, whose defaults would bind a group initialised before it:
# held there, the group's gloo threads outlive the interpreter and abort the process at exit
import torch.distributed as dist
import torch.distributed.nn.functional as F

held = [
    name for name, f in vars(F).items()
    if any(isinstance(d, dist.ProcessGroup) for d in getattr(f, "__defaults__", None) or ())
]
print("functions holding the process group", json.dumps(held))
sys.exit(max(codes))
"""

# 400 images, 101 held out: 299 training images in batches of 64, so the last global batch (43) splits
# 22 / 21: unequal shares, which the loss weighting must handle exactly
SETTINGS = dict(
    dataset="mnist", val_size=101, latent_dim=3, hidden=16, epochs=3, batch_size=64, device="cpu",
    pictures=False, seed=7, pixels="dynamic", posterior="ar1",
)  # fmt: skip


def cli_args(data_dir, run_dir, **kw):
    settings = {**SETTINGS, "data_dir": str(data_dir), **kw}
    args = ["-q", "train", "--run-dir", str(run_dir)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return args


def torchrun(jobs, cwd, env=None):
    """One torchrun job of two processes: ``jobs`` (dicts with an ``argv``) through the driver, or a
    list holding one argv: ``python -m rhovae ARGV``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if isinstance(jobs[0], dict):
        (cwd / "driver.py").write_text(DRIVER)
        cmd += [str(cwd / "driver.py"), json.dumps(jobs)]
    else:
        cmd += ["-m", "rhovae", *jobs[0]]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        del r["epoch_seconds"], r["samples_per_second"]
    return rows


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One torchrun job: a refused batch size, ``two`` (noise-free, to compare with one process),
    ``ref`` (real noise, to compare with an interrupted and resumed job) and ``legacy``."""
    root = tmp_path_factory.mktemp("ddp")
    data_dir = write_idx_dataset(root / "idx")
    jobs = [
        {"argv": cli_args(data_dir, root / "odd", batch_size=63)},
        {"argv": cli_args(data_dir, root / "two"), "mean_sample": True},
        {"argv": cli_args(data_dir, root / "ref")},
        # a learned prior the paper-legacy objective never differentiates: DDP must not wait for it
        {"argv": cli_args(data_dir, root / "legacy", epochs=1, kl_estimator="paper-legacy", prior="ar1")},
    ]
    proc = torchrun(jobs, root)
    assert "exit codes [2, 0, 0, 0]" in proc.stdout, proc.stderr[-3000:]
    assert "functions holding the process group []" in proc.stdout
    assert proc.stdout.count("epoch 3: test loss") == 2  # rank 0 alone prints each run's summary
    return root, data_dir, proc


def test_two_processes_give_the_numbers_of_one(two_process_runs, tmp_path, monkeypatch):
    root, data_dir, _ = two_process_runs
    monkeypatch.setattr(
        AR1Normal,
        "rsample",
        lambda self, sample_shape=(): self.loc.expand(self._extended_shape(sample_shape)),
    )
    train(RunConfig(**SETTINGS, data_dir=str(data_dir)), tmp_path / "one", progress=False)
    one, two = metrics(tmp_path / "one"), metrics(root / "two")
    assert [r["epoch"] for r in two] == ["1", "2", "3"]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert float(a[key] or "nan") == pytest.approx(float(b[key] or "nan"), rel=1e-5, nan_ok=True), key
    p1 = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    p2 = load_checkpoint(root / "two" / "last.pt")["model"]
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-5, msg=name)
    ckpt = load_checkpoint(root / "two" / "last.pt", resume=True)
    assert len(ckpt["rng"]["ranks"]) == 2  # each rank's own noise, for --resume


def test_a_dying_rank_stops_the_job_and_resume_continues_it(two_process_runs):
    root, data_dir, _ = two_process_runs
    cut = root / "cut"
    proc = torchrun([{"argv": cli_args(data_dir, cut)}], root, env={"FAIL_RANK_EPOCH": "1:2"})
    assert proc.returncode != 0
    assert "simulated crash of rank 1" in proc.stderr
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1
    proc = torchrun([[*cli_args(data_dir, cut), "--resume"]], root)  # python -m rhovae
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every rank's noise was restored: the numbers of the uninterrupted job
    assert metrics(cut) == metrics(root / "ref")
    ref, resumed = (load_checkpoint(d / "last.pt")["model"] for d in (root / "ref", cut))
    assert all(torch.equal(v, resumed[k]) for k, v in ref.items())


def test_a_batch_the_world_does_not_divide_is_refused(two_process_runs):
    *_, proc = two_process_runs
    assert "--batch-size 63 is the global batch and must split evenly over 2 processes" in proc.stderr


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_each_global_batch_and_weighted_gradients_are_exact(world):
    # the trainer's rule without processes: each share's mean loss weighted by its share times the world,
    # averaged over ranks as DDP does, is the global batch's mean; a share may be empty (weight 0)
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    for n in (64, 43, 2):
        x = torch.randn(n, 5)
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        (full,) = torch.autograd.grad((x @ w).pow(2).mean(), w)
        total = torch.zeros(5)
        for lo, hi in bounds:
            share = x[lo:hi] if hi > lo else x[:1]
            weight = (hi - lo) * world / n
            total += torch.autograd.grad((share @ w).pow(2).mean() * weight, w)[0] / world
        torch.testing.assert_close(total, full)


def test_sharded_batches_are_the_one_process_batches():
    x = torch.rand(299, 1, 6, 6)
    data = Data(x, x[:10], x[:10], pixels="dynamic")

    def epoch(rank=0, world=1):
        gens = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        return list(data.train_batches(64, *gens, rank=rank, world=world))

    shards = [epoch(r, 3) for r in range(3)]
    for whole, *parts in zip(epoch(), *shards, strict=True):
        assert torch.equal(whole, torch.cat(parts))  # binarisation included


def test_python_m_rhovae_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "rhovae", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--precision" in proc.stdout and "--compile" in proc.stdout


def test_ar1_sample_and_kl_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    for d in (10, 64):  # the small-d dense path and the scan
        loc, rho = torch.randn(32, d), torch.rand(32, 1) * 1.8 - 0.9
        q = AR1Normal(loc, rho, torch.rand(32, 1) + 0.5)
        torch.manual_seed(1)
        z, kl = q.rsample(), kl_divergence(q, StandardNormal(d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            z16, kl16 = q.rsample(), kl_divergence(q, StandardNormal(d))
            lp16 = q.log_prob(z)
        assert z16.dtype == kl16.dtype == torch.float32
        torch.testing.assert_close(z16, z)
        torch.testing.assert_close(kl16, kl)
        torch.testing.assert_close(lp16, q.log_prob(z))


def test_bf16_precision_trains_and_keeps_probability_math_in_float32(idx_dir, tmp_path, monkeypatch):
    seen = []
    original = AR1Normal.__init__

    def spy(self, loc, rho, scale, *args, **kw):
        seen.append((loc.dtype, rho.dtype, scale.dtype))
        original(self, loc, rho, scale, *args, **kw)

    monkeypatch.setattr(AR1Normal, "__init__", spy)
    cfg = RunConfig(**{**SETTINGS, "epochs": 1, "data_dir": str(idx_dir)}, precision="bf16")
    result = train(cfg, tmp_path / "bf16", progress=False)
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)
    ckpt = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    with pytest.raises(RhovaeError, match="unknown precision 'fp16'"):
        RunConfig(precision="fp16").validate()


def test_compile_option_runs(idx_dir, tmp_path, monkeypatch):
    # dynamo's graph capture and AOT autograd, as --compile runs them, without inductor's C++ build
    # (30 s on two cores): the backend is the one thing replaced
    original = torch.nn.Module.compile
    compiled = []

    def compile_eagerly(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": "aot_eager"})

    try:
        torch.compile(lambda t: t * 2, backend="aot_eager")(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means compile is unavailable on this platform
        pytest.skip(f"torch.compile is unavailable here: {type(e).__name__}")
    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    # one batch shape (300 training images in batches of 100): each network compiles once per mode
    settings = {**SETTINGS, "epochs": 1, "data_dir": str(idx_dir), "val_size": 100, "batch_size": 100}
    result = train(RunConfig(**settings, compile=True), tmp_path / "compiled", progress=False)
    assert compiled == ["MLPEncoder", "MLPDecoder"]
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    assert "_orig_mod" not in "".join(load_checkpoint(tmp_path / "compiled" / "last.pt")["model"])
