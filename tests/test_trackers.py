"""TensorBoard and MLflow, read back with their own readers: TensorBoard's EventAccumulator and MLflow's
MlflowClient (not by checking that files exist)."""

import builtins

import pytest
from conftest import train_argv, write_idx_dataset

from rhovae.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("data") / "idx")


def tiny(data, run, epochs, *extra):
    flags = f"--dataset mnist --data-dir {data} --val-size 100 --latent-dim 3 --hidden 16 --batch-size 100"
    return train_argv(run, flags, f"--epochs {epochs}", *extra)


def _accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_samples_and_hparams(data, tmp_path):
    run = tmp_path / "run"
    assert main(tiny(data, run, 2, "--tensorboard")) == 0
    acc = _accumulator(run / "tensorboard")
    tags = acc.Tags()
    for name in ("train_loss", "val_loss", "test_loss", "train_kl", "beta", "lr"):
        assert [e.step for e in acc.Scalars(name)] == [1, 2], name
    with open(run / "metrics.csv") as f:
        last_val = float(f.read().splitlines()[-1].split(",")[4])
    assert acc.Scalars("val_loss")[-1].value == pytest.approx(last_val, rel=1e-5)
    assert "samples" in tags["images"] and [e.step for e in acc.Images("samples")] == [1, 2]
    assert acc.Images("samples")[0].width > 12 * 8  # an 8x8 grid of 12x12 images
    # the settings as hyperparameters, with the final metrics, in the HParams plugin's records
    plugin = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugin and "_hparams_/session_start_info" in plugin
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["latent_dim"].number_value == 3 and hparams["posterior"].string_value == "ar1"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparam/best_val_loss", "hparam/test_loss"}
    assert acc.Scalars("hparam/test_loss")[0].value == pytest.approx(acc.Scalars("test_loss")[-1].value)


def test_mlflow_run_params_metrics_artifacts_and_resume(data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(tiny(data, run, 2, "--mlflow")) == 0  # default: ./mlruns
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("rhovae")
    (mirror,) = client.search_runs([experiment.experiment_id])
    assert mirror.info.run_name == "run" and mirror.info.status == "FINISHED"
    assert mirror.data.params["latent_dim"] == "3" and mirror.data.params["dataset"] == "mnist"
    history = client.get_metric_history(mirror.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(mirror.info.run_id)}
    assert {"config.toml", "metrics.csv"} <= artifacts
    # a resumed run continues its MLflow run
    assert main(tiny(data, run, 3, "--mlflow", "--resume")) == 0
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(mirror.info.run_id, "val_loss")] == [1, 2, 3]


def test_compare_groups_its_runs_in_one_mlflow_experiment_with_the_report(data, tmp_path):
    from conftest import toy_experiment
    from mlflow.tracking import MlflowClient

    from rhovae.experiments import compare
    from rhovae.trackers import mlflow_uri

    uri = mlflow_uri(str(tmp_path / "tracking"))
    compare(toy_experiment(data), tmp_path / "out", mlflow=uri)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"mlp-mnist-diagonal-s0", "mlp-mnist-ar1-s0", "report"}
    assert "eval_iwae_nll" in by_name["mlp-mnist-ar1-s0"].data.metrics
    assert "report.md" in {a.path for a in client.list_artifacts(by_name["report"].info.run_id)}


def test_a_tracker_flag_without_its_package_is_one_line(data, tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] in ("mlflow", "tensorboard") or name == "torch.utils.tensorboard":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    for flag, package in (("--mlflow", "mlflow"), ("--tensorboard", "tensorboard")):
        assert main(tiny(data, tmp_path / flag.strip("-"), 1, flag)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"rhovae: error: {flag} needs the {package} package: pip install 'rhovae[{package}]'"
