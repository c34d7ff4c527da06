"""`rhovae compare --ray`: each grid cell a Ray task on a local Ray instance gives the runs of --jobs 1;
without Ray, one line says how to install it."""

import csv
import sys

import pytest
from conftest import toy_experiment

from rhovae.errors import RhovaeError
from rhovae.experiments import compare


def toy(idx_dir):
    return toy_experiment(idx_dir, pictures=False)


def rows(out):
    with open(out / "runs.csv") as f:
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader(f)]


def test_ray_tasks_give_the_runs_of_one_process(idx_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    compare(toy(idx_dir), tmp_path / "jobs", jobs=1)
    monkeypatch.chdir(tmp_path)  # a relative output folder: the tasks must still find it
    report = compare(toy(idx_dir), "ray", ray="local", ray_cpus_per_run=1)
    assert report.resolve() == tmp_path / "ray" / "report.md"
    assert rows(tmp_path / "jobs") == rows(tmp_path / "ray")
    assert len(rows(tmp_path / "ray")) == 2


def test_without_ray_one_line_says_how_to_install_it(idx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(RhovaeError, match=r"pip install 'rhovae\[ray\]'") as e:
        compare(toy(idx_dir), tmp_path / "out", ray="local")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_ray_and_jobs_exclude_each_other(idx_dir, tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(RhovaeError, match="--jobs and --ray exclude each other"):
        compare(toy(idx_dir), tmp_path / "out", jobs=2, ray="local")
