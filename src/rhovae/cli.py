"""The ``rhovae`` command: thin; it parses, calls the library, and prints what a person needs.

    rhovae train --dataset fashion-mnist --posterior ar1 --latent-dim 10 --epochs 15 --run-dir runs/x
    rhovae evaluate runs/x --iwae-k 1000
    rhovae sample runs/x
    rhovae reconstruct runs/x
    rhovae explore runs/x

Errors a user can cause print one line and exit with status 2; nothing is lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from rhovae.config import RunConfig, from_dict, load_config, not_own_likelihood
from rhovae.errors import RhovaeError
from rhovae.experiments import PRESETS
from rhovae.model import MODELS


def config_flags() -> dict[str, str]:
    """Every run setting's flag and help text, from the config's field metadata (one source of truth)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(RunConfig)}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    group = parser.add_argument_group("run configuration (each overrides --config)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f.metadata.get("help", "").replace("%", "%%")
        choices = f.metadata.get("choices")
        if choices is not None:
            text += f" [one of: {', '.join(choices())}]"
        help_text = f"{text} (default: {default!r})"
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=f.name, type=type(default), default=None, help=help_text, metavar=f.name.upper()
            )


def _add_tracker_flags(parser: argparse.ArgumentParser) -> None:
    """TensorBoard and MLflow, for train and compare (rhovae.trackers)."""
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard event files to RUN/tensorboard: metrics per epoch, prior samples, the "
        "settings as hyperparameters with the final metrics (pip install 'rhovae[tensorboard]')",
    )
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="./mlruns",
        metavar="URI",
        help="log each run to MLflow: parameters, per-epoch metrics, evaluation, pictures and reports as "
        "artifacts; URI: a tracking URI or a folder (default ./mlruns, a local file store) "
        "(pip install 'rhovae[mlflow]')",
    )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """What every command that reads a finished run takes."""
    parser.add_argument("run", type=Path, help="run folder")
    parser.add_argument(
        "--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default: best)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def _version() -> str:
    import torch

    import rhovae

    return f"rhovae {rhovae.__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors in the one line every rhovae error takes (not a usage block)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"rhovae: error: {_one_line(message)}; see '{self.prog} --help'\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="rhovae", description="Variational autoencoders with structured posteriors (the exact rho-VAE)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    parser.add_argument(
        "--version", action="version", version=_version(), help="print rhovae's and torch's versions and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineParser)

    p = sub.add_parser(
        "train",
        help="train a VAE into a run folder",
        description="Train a VAE; writes config.toml, metrics.csv, last.pt, best.pt and pictures.",
    )
    p.add_argument("--config", type=Path, help="TOML file with run settings; flags override it")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/DATASET-MODEL-POSTERIOR-dD-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --run-dir (its checkpoints, metrics, config and pictures) with a new one",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_tracker_flags(p)
    _add_config_flags(p)

    p = sub.add_parser(
        "evaluate",
        help="test ELBO, IWAE NLL, active units and posterior statistics",
        description="Evaluate a run on its test split; prints and writes evaluation.json.",
    )
    _add_run_flags(p)
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples per image (default: 1000)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N test images (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo estimates (default: 0)")

    p = sub.add_parser(
        "compare",
        help="run a grid of runs (an experiment) and write its report",
        description="Run every point of an experiment grid (a TOML file or a preset), skipping finished "
        "runs, then write report.md, report.json, runs.csv and pictures with means, sds and paired "
        "intervals.",
    )
    p.add_argument("experiment", nargs="?", help="experiment TOML file (or use --preset)")
    p.add_argument("--preset", choices=list(PRESETS), help="a shipped experiment")
    p.add_argument("--out", type=Path, help="output folder (default: runs/compare-NAME)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, in separate processes (default: 1)"
    )
    p.add_argument("--device", help="device of every run (default: the experiment's, else auto)")
    p.add_argument(
        "--kl-estimator",
        choices=["exact", "paper-legacy"],
        help="paper-legacy: train with the reference code's sampler and KL (NOT an ELBO)",
    )
    p.add_argument("--epochs", type=int, help="override the experiment's epochs (e.g. for a quick look)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs only")
    _add_tracker_flags(p)
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run each grid cell as a Ray task on the cluster at ADDRESS (auto, HOST:PORT, "
        "ray://HOST:PORT), or on a Ray instance started for the command (local); needs "
        "pip install 'rhovae[ray]'",
    )
    p.add_argument(
        "--ray-cpus-per-run", type=float, default=1.0, metavar="N",
        help="CPUs (and torch threads) each Ray task holds (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--ray-gpus-per-run", type=float, default=0.0, metavar="N",
        help="GPUs each Ray task holds; a fraction shares a GPU (default: 0)",
    )  # fmt: skip

    p = sub.add_parser(
        "explore",
        help="latent traversals, interpolations and a 2-D PCA of the posterior means",
        description="Write traversals.png (each latent dimension swept over +-3 sd of the test split's "
        "posterior means around a test example), interpolations.png (between test examples) and "
        "latent_pca.png (posterior means projected on 2 principal axes, coloured by label when labels "
        "exist).",
    )
    _add_run_flags(p)
    p.add_argument("--out", type=Path, help="output folder (default: RUN/explore)")
    p.add_argument("--seed", type=int, default=0, help="which test examples are shown (default: 0)")

    p = sub.add_parser(
        "sample",
        help="write a PNG grid of samples from the prior",
        description="Decode z ~ p(z) and write the means as a PNG grid.",
    )
    _add_run_flags(p)
    p.add_argument("-n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sequence runs: sample each token at this temperature instead of the greedy decode (default: 0, "
        "greedy)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output file (default: RUN/samples.png, one sequence a row for frame sequences; RUN/samples.pt "
        "for vector data)",
    )

    p = sub.add_parser(
        "reconstruct",
        help="write test images beside their reconstructions",
        description="Encode test images, decode the posterior means, write pairs as a PNG grid (frame "
        "sequences: each sequence, missing values black, above its imputation, one frame a column).",
    )
    _add_run_flags(p)
    p.add_argument("-n", type=int, default=32, help="number of test images (default: 32)")
    p.add_argument("--out", type=Path, help="output PNG (default: RUN/reconstructions.png)")
    return parser


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    try:
        cfg = load_config(args.config) if args.config else RunConfig()
    except RecursionError:  # tomllib recurses once per level of nesting
        raise RhovaeError(f"{args.config}: nested too deeply to be a run configuration") from None
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if getattr(args, f.name) is not None
    }
    resolved = from_dict(overrides, base=cfg, where="command line").validate()
    if resolved.latent_dim == 0 and args.posterior is not None:
        raise RhovaeError(
            f"latent-dim 0 has no latent, so posterior {args.posterior} cannot apply; drop it or give a "
            "latent-dim"
        )
    own = MODELS[resolved.model].likelihood if resolved.model in MODELS else ""
    if own and args.likelihood not in (None, own):  # validate() lets the default through, not the flag
        raise not_own_likelihood(resolved.model, args.likelihood)
    return resolved


def cmd_train(args: argparse.Namespace) -> int:
    from rhovae.train import train

    cfg = _resolve_config(args)
    run_dir = args.run_dir or Path("runs") / (
        f"{cfg.dataset}-{cfg.model}-{cfg.posterior}-d{cfg.latent_dim}-s{cfg.seed}".replace(":", "_").replace(
            "/", "_"
        )
    )
    try:
        if args.resume and args.overwrite:
            raise RhovaeError("--resume continues a run and --overwrite replaces it; give one of them")
        from rhovae.trackers import mlflow_uri

        result = train(
            cfg, run_dir, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty(),
            overwrite=args.overwrite, tensorboard=args.tensorboard,
            mlflow=mlflow_uri(args.mlflow) if args.mlflow else None,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"rhovae: interrupted; {_saved_epoch(run_dir, cfg.epochs)}", file=sys.stderr)
        return 130
    if result.history and result.rank == 0:  # one summary per torchrun job
        last = result.history[-1]
        print(
            f"{run_dir}: epoch {last['epoch']}: test loss {last['test_loss']:.3f} nats/sample "
            f"(best validation {result.best_val_loss:.3f} at epoch {result.best_epoch})"
        )
    return 0


def _saved_epoch(run_dir: Path, epochs: int) -> str:
    """What an interrupted run left: the epoch its last.pt holds, read back, or that none finished."""
    from rhovae.runs import load_checkpoint

    last = run_dir / "last.pt"
    if not last.exists():
        return "no epoch had finished; run the same command again to start over"
    try:
        epoch = load_checkpoint(last)["epoch"]
    except RhovaeError:
        return f"{last} is unreadable; start over in a new --run-dir"
    return f"epoch {epoch} of {epochs} is saved in {last} (continue with --resume)"


MAX_SEED = 2**63


def _check_seed(seed: int) -> None:
    if not 0 <= seed < MAX_SEED:
        raise RhovaeError(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def _test_split(cfg: RunConfig, device, limit: int = 0):
    from rhovae.runs import prepare_data

    test = prepare_data(cfg, device).test
    return test[: min(limit, len(test))] if limit > 0 else test


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rhovae.evaluate import INTERPOLATION_PAIRS, INTERPOLATION_POINTS, evaluate_run, write_evaluation

    _check_seed(args.seed)
    result = evaluate_run(
        args.run, args.iwae_k, args.checkpoint, args.limit, args.device, args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )  # fmt: skip
    cfg = result["config"]
    print(
        f"{args.run} ({cfg['posterior'] if cfg['latent_dim'] else 'no latent'}, {cfg['dataset']}, "
        f"likelihood {cfg['likelihood']}, "
        f"{result['test_images']} test examples, {args.checkpoint}.pt epoch {result['epoch']})"
    )
    if cfg["kl_estimator"] != "exact":
        print(f"  trained with the {cfg['kl_estimator']} KL estimator: its training loss was NOT an ELBO")
    print(
        f"  test negative ELBO  {result['test_neg_elbo']:.3f} nats/sample "
        f"(reconstruction {result['test_recon']:.3f} + KL {result['test_kl']:.3f})"
    )
    observed = " of the observed values" if result.get("observed_fraction", 1.0) < 1 else ""
    print(f"  IWAE NLL (k={args.iwae_k})  {result['iwae_nll']:.3f} ± {result['iwae_nll_se']:.3f}{observed}")
    units = len(result["active_unit_variances"])
    print(f"  active units        {result['active_units']} of {units}")
    if "imputation_mse" in result:
        print(
            f"  imputation          NLL {result['imputation_nll']:.4f} nats and MSE "
            f"{result['imputation_mse']:.4f} per missing value ({result['missing_values']:,} values; "
            f"mean imputation's MSE {result.get('imputation_mse_mean', math.nan):.4f})"
        )
    if "active_units_per_group" in result:
        print(f"  per latent group    {result['active_units_per_group']}")
    if "active_units_per_channel" in result:
        shape = cfg["latent_shape"]
        print(f"  per channel         {result['active_units_per_channel']} (latent map {shape})")
    if "mutual_information_examples" in result:
        n_mi = result["mutual_information_examples"]
        if "mutual_information" in result:
            print(
                f"  mutual information  {result['mutual_information']:.3f} nats "
                f"(He et al. estimator, {n_mi} test examples)"
            )
        else:
            print("  mutual information  n/a (the posterior gives no log-density at other examples' codes)")
    if "validity" in result:  # sequence runs
        print(
            f"  reconstruction      {result['recon_seq_acc']:.3f} of sequences, "
            f"{result['recon_token_acc']:.3f} of tokens recovered (greedy decode at the posterior mean)"
        )
        print(
            f"  1,000 prior samples validity {result['validity']:.3f}, "
            f"uniqueness {result['uniqueness']:.3f}, novelty {result['novelty']:.3f}"
        )
    if "interpolation_validity" in result:
        print(
            f"  interpolation validity {result['interpolation_validity']:.3f} (greedy decodes at "
            f"{INTERPOLATION_POINTS} interior points between the posterior means of {INTERPOLATION_PAIRS} "
            "pairs of test sequences)"
        )
    for name, stats in result["posterior_statistics"].items():
        if isinstance(stats, dict):
            print(
                f"  {name:<4} median {stats['q50']:.4g}  [1%, 99%] = [{stats['q01']:.4g}, {stats['q99']:.4g}]"
                + (
                    f"  mean |rho| {result['posterior_statistics']['mean_abs_rho']:.3f}"
                    if name == "rho"
                    else ""
                )
            )
    # printed first, so a write failure loses nothing the user needs
    try:
        out = write_evaluation(args.run, result)
    except RhovaeError as e:
        print(f"rhovae: error: {e} (the figures above are complete)", file=sys.stderr)
        return 2
    print(f"  written to {out}")
    return 0


MAX_SAMPLES = 4096


def cmd_sample(args: argparse.Namespace) -> int:
    from rhovae.plots import is_frame_shape, is_image_shape, save_image_grid
    from rhovae.runs import load_run

    if not 1 <= args.n <= MAX_SAMPLES:
        raise RhovaeError(f"-n must be between 1 and {MAX_SAMPLES}, got {args.n}")
    _check_seed(args.seed)
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise RhovaeError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    model, _, ckpt = load_run(args.run, args.checkpoint, args.device)
    meta = ckpt.get("data_meta") or {}
    if "vocab" in meta:  # sequences: printed as text, one per line
        import torch

        from rhovae.data.sequences import SequenceVocab, to_text

        vocab = SequenceVocab.from_dict(meta["vocab"])
        if args.temperature > 0:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                z = model.prior().sample((args.n,))
                samples = model.decode(z).sample(temperature=args.temperature)
        else:
            samples = model.sample(args.n, seed=args.seed)
        for s in samples:
            print(to_text(s, vocab))
        return 0
    shape = tuple(ckpt["data_shape"])
    frames = is_frame_shape(shape)  # sequences of frames: one sequence a row
    images = is_image_shape(shape) or frames
    out = _output_file(args.out, args.run, "samples.png" if images else "samples.pt")
    samples = model.sample(args.n, seed=args.seed)
    if frames:
        save_image_grid(samples.flatten(0, 1), out, nrow=shape[0])
        print(out)
        return 0
    if not images:
        from rhovae.runs import save_atomic

        save_atomic(samples.cpu(), out)
        print(out)
        return 0
    save_image_grid(samples, out)
    print(out)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from rhovae.plots import is_frame_shape, is_image_shape, save_image_grid
    from rhovae.runs import load_run

    if not 1 <= args.n <= MAX_SAMPLES:
        raise RhovaeError(f"-n must be between 1 and {MAX_SAMPLES}, got {args.n}")
    model, cfg, ckpt = load_run(args.run, args.checkpoint, args.device)
    shape = tuple(ckpt["data_shape"])
    if is_frame_shape(shape):  # each test sequence (missing values black) above its imputation
        x = _test_split(cfg, model.device, args.n)
        pairs = torch.stack([x.nan_to_num(0.0), model.reconstruct(x)], dim=1).flatten(0, 2)
        out = _output_file(args.out, args.run, "reconstructions.png")
        save_image_grid(pairs, out, nrow=shape[0])
        print(out)
        return 0
    if not is_image_shape(shape):
        raise RhovaeError(f"{args.run}: reconstructions are pictures; this run's data is not images")
    out = _output_file(args.out, args.run, "reconstructions.png")
    x = _test_split(cfg, model.device, args.n)
    pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
    save_image_grid(pairs, out, nrow=16)
    print(out)
    return 0


# what a run folder's own records are: an --out never replaces one of them
RUN_RECORDS = frozenset({"config.toml", "metrics.csv", "last.pt", "best.pt", "evaluation.json", ".lock"})


def _output_file(out: Path | None, run: Path, default: str) -> Path:
    """Where ``sample``/``reconstruct`` write: ``RUN/default`` unless ``--out`` says, which must be a
    file of the default's kind (suffix) and never one of a run's own records, nor a folder."""
    if out is None:
        return run / default
    suffix = Path(default).suffix
    if out.is_dir():
        raise RhovaeError(f"--out {out} is a folder; give a file name ending in {suffix}")
    if out.suffix.lower() != suffix:
        raise RhovaeError(f"--out {out}: this run writes {suffix} files; give a name ending in {suffix}")
    if out.name in RUN_RECORDS:
        raise RhovaeError(f"--out {out} is a run's own record; choose another file name")
    return out


def cmd_explore(args: argparse.Namespace) -> int:
    from rhovae.plots import explore
    from rhovae.runs import load_run, prepare_data

    _check_seed(args.seed)
    model, cfg, _ = load_run(args.run, args.checkpoint, args.device)
    if cfg.latent_dim == 0:
        raise RhovaeError(f"{args.run} has no latent (latent-dim 0, a language model): nothing to explore")
    data = prepare_data(cfg, model.device)
    out = args.out or args.run / "explore"
    for path in explore(model, data, out, seed=args.seed):
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rhovae.experiments import compare, load_experiment, print_summary, write_report

    if bool(args.experiment) == bool(args.preset):
        raise RhovaeError(f"give an experiment file or --preset NAME (one of {', '.join(PRESETS)})")
    if args.jobs < 1:
        raise RhovaeError(f"--jobs must be positive, got {args.jobs}")
    exp = load_experiment(args.preset or args.experiment)
    overrides = {
        k: v
        for k, v in (("device", args.device), ("kl_estimator", args.kl_estimator), ("epochs", args.epochs))
        if v is not None
    }
    if overrides.get("kl_estimator") == "paper-legacy":
        exp.name += "-paper-legacy"
    out = args.out or Path("runs") / f"compare-{exp.name}"
    if args.report_only:
        if overrides:
            exp = dataclasses.replace(exp, run={**exp.run, **overrides})
        report = write_report(exp, out)
    else:
        from rhovae.trackers import mlflow_uri

        report = compare(
            exp, out, jobs=args.jobs, overrides=overrides, ray=args.ray,
            ray_cpus_per_run=args.ray_cpus_per_run, ray_gpus_per_run=args.ray_gpus_per_run,
            tensorboard=args.tensorboard, mlflow=mlflow_uri(args.mlflow) if args.mlflow else None,
        )  # fmt: skip
    print_summary(report)
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "reconstruct": cmd_reconstruct,
    "explore": cmd_explore,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        return COMMANDS[args.command](args)
    except RhovaeError as e:
        print(f"rhovae: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``rhovae evaluate RUN | head``): stop quietly; the
        # work is done and saved (what it printed is only a summary), so this is no failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"rhovae: error: {_one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rhovae: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _out_of_memory(e):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(
                f"rhovae: error: out of memory ({first}); use a smaller --batch-size, model, -n or --iwae-k",
                file=sys.stderr,
            )
            return 2
        import traceback

        traceback.print_exc()
        print(
            "rhovae: internal error (a bug, not your input): please report it with the command and the "
            "traceback above",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    """A message as the one line the CLI promises (an embedded file name or quoted error may hold
    line breaks)."""
    return " ".join(text.split("\n")).strip()


def _out_of_memory(e: BaseException) -> bool:
    """Host or device memory ran out: the input's size is the cause, not a bug."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)


if __name__ == "__main__":
    sys.exit(main())
