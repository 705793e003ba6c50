"""The few-shot training configuration: a frozen dataclass, one ``imgtriage train-fewshot``
option per field (help text and flag in each field's metadata). No torch here: the command
line builds its options from it at start-up.

Few-shot training runs in the common loop (:func:`imgtriage.train.loop.fit`), so the knobs it
shares with ``imgtriage train`` (epochs, learning rate, weight decay, input, split, seed,
early stopping, checkpoints) are checked by :class:`~imgtriage.train.config.TrainConfig`:
:meth:`FewShotConfig.train_config` is the loop's configuration of a run, and building it is
part of validating this one. Only the few-shot knobs are checked here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from imgtriage.errors import ConfigError
from imgtriage.train.config import TrainConfig

ENCODERS = ("auto", "episodic", "pretrained")
# --encoder pretrained: the backbone whose registered ImageNet weights it uses
PRETRAINED_BACKBONE = "efficientnet_lite0"
EPISODIC_SIZE = 64  # --img-size of the episodic encoder when not given
LOSSES = ("proto", "triplet")
MINING = ("semihard", "hard")
AUGMENTS = ("none", "flip", "d4")
# --augment -> the common loop's policy of the same effect (d4: flips and 90-degree turns)
_AUGMENT_POLICY = {"none": "none", "flip": "flip", "d4": "flip_rot90"}
# the episodic schedule when --episodes / --patience are not given: 100 episodes per epoch
# and early stopping on validation. Sizing the episodes to one pass over the training crops
# (20-100) cut the time 0.3-0.4x but lost seen-class accuracy, which the bundle's own gallery
# serves (MSTAR validation gallery accuracy 0.984 -> 0.921, 3 seeds; docs/benchmarks.md,
# few-shot section, session 10), so the default stays 100.
DEFAULT_EPISODES = 100
DEFAULT_PATIENCE = 3


def _f(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A field with its ``imgtriage train-fewshot`` option (``cli/_options.py``)."""
    meta = {"help": help, "flag": flag}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FewShotConfig:
    """Every knob of a few-shot run; errors name the ``imgtriage train-fewshot`` flag.

    Example:
        >>> FewShotConfig(loss="triplet", mining="hard").n_way
        5
    """

    encoder: str = _f("auto", "auto: the pretrained backbone for colour photos when its "
                              "weights are installed (no training), else episodic; episodic: "
                              "train a Siamese encoder on these images; pretrained (= "
                              "efficientnet_lite0) or efficientnet_lite0/1/2: enrol every "
                              "image through that ImageNet backbone, no training (the "
                              "episode and optimiser options then do not apply).")
    loss: str = _f("proto", "proto (prototypical episodes) or triplet.")
    mining: str = _f("semihard", "Triplet mining: semihard or hard.")
    margin: float = _f(0.2, "Triplet margin (squared distance of unit vectors).")
    n_way: int = _f(5, "Classes per episode / batch.")
    k_shot: int = _f(5, "Support crops per class in an episode.")
    n_query: int = _f(5, "Query crops per class in an episode.")
    episodes: int | None = _f(None, "Episodes per epoch (not given: 100).")
    epochs: int = _f(10, "Training epochs (at most: --patience stops earlier).")
    embed_dim: int = _f(128, "Embedding size.")
    widths: tuple[int, ...] = _f((32, 64, 128), "Encoder channel widths, comma-separated.")
    scale: float | None = _f(None, "Logit scale on cosine similarities. Not given: the "
                                   "prototype loss trains at 10 and the gallery's scale is "
                                   "fitted like a temperature on held-out similarities (the "
                                   "validation split, else the enrolled images held out in "
                                   "turn; kept when it lowers their NLL) and refitted by "
                                   "`gallery add/remove`; given: used as it is, never refitted.")
    lr: float = _f(2e-3, "Peak learning rate (warm-up then cosine).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    img_size: int | None = _f(None, "Input size in pixels (square); default: 64 for the "
                                    "episodic encoder, the weights' own (224) for a "
                                    "pretrained one.")
    in_chans: int | None = _f(None, "Input channels; default: from the data.")
    scaling: str = _f("dtype", "Pixel scaling: dtype, minmax or percentile.")
    augment: str = _f("flip", "none, flip, or d4 (flips + 90-degree turns).")
    val_frac: float = _f(0.15, "Share of each class held out for validation.")
    method: str = _f("prototype", "Gallery scoring: prototype or knn.")
    knn_k: int = _f(1, "Neighbours per class for --method knn.")
    keep_rate: float = _f(0.95, "Share of correct validation crops kept above the fitted "
                                "similarity threshold.")
    seed: int = _f(0, "Seed for splits, episodes and initialisation.")
    num_threads: int | None = _f(None, "Compute threads (default: all cores).",
                                 flag="--threads")
    decode_workers: int | None = _f(None, "Threads decoding the images (default: up to 4).")
    patience: int | None = _f(None, "Early stopping: epochs without a better validation "
                                    "gallery accuracy, the best epoch's weights kept (0 = off). "
                                    "Not given: 3 (with a validation split).")
    checkpoint_every: int = _f(1, "Save a resumable checkpoint in OUT/checkpoint every N "
                                  "epochs (0 = never); train_fewshot(..., resume=True) "
                                  "continues it exactly.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        checks = [
            (self.loss in LOSSES, f"loss must be one of {LOSSES} (--loss)"),
            (self.mining in MINING, f"mining must be one of {MINING} (--mining)"),
            (self.margin > 0, "margin must be positive (--margin)"),
            (self.n_way >= 2, "an episode needs at least 2 classes (--n-way)"),
            (self.k_shot >= 1, "k_shot must be >= 1 (--k-shot)"),
            (self.n_query >= 1, "n_query must be >= 1 (--n-query)"),
            (self.episodes is None or self.episodes >= 1,
             "episodes per epoch must be >= 1 (--episodes)"),
            (self.patience is None or self.patience >= 0, "patience must be >= 0 (--patience)"),
            (self.embed_dim >= 2, "embed_dim must be >= 2 (--embed-dim)"),
            (self.scale is None or self.scale > 0, "scale must be positive (--scale)"),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS} (--augment)"),
            (self.knn_k >= 1, "k must be >= 1 (--knn-k)"),
            (0 < self.keep_rate <= 1, "keep rate must be in (0, 1] (--keep-rate)"),
            (self.img_size is None or self.img_size >= 8, "image size must be >= 8 pixels "
                                                          "(--img-size)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.encoder not in ENCODERS:
            from imgtriage.models.pretrained import get_weights

            if get_weights(self.encoder) is None:
                raise ConfigError(f"encoder must be one of {ENCODERS} or a backbone with "
                                  "registered pretrained weights (efficientnet_lite0/1/2), "
                                  f"got {self.encoder!r} (--encoder)")
        self.train_config()  # the knobs shared with `imgtriage train`, checked there
        from imgtriage.models.gallery import GalleryConfig

        GalleryConfig(method=self.method, k=self.knn_k, scale=self.start_scale())  # --method

    def start_scale(self) -> float:
        """The logit scale training uses and the gallery's fit starts from: ``scale`` when
        given, else the default (10).

        Example:
            >>> FewShotConfig().start_scale(), FewShotConfig(scale=20).start_scale()
            (10.0, 20)
        """
        from imgtriage.models.gallery import DEFAULT_SCALE

        return DEFAULT_SCALE if self.scale is None else self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def backbone(self) -> str | None:
        """The pretrained backbone ``encoder`` names (None: episodic, or auto's choice).

        Example:
            >>> FewShotConfig(encoder="pretrained").backbone()
            'efficientnet_lite0'
        """
        if self.encoder in ("auto", "episodic"):
            return None
        return PRETRAINED_BACKBONE if self.encoder == "pretrained" else self.encoder

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "widths": list(self.widths)}

    def episode_size(self, num_classes: int | None = None) -> int:
        """Crops per episode: ``n_way`` classes (at most ``num_classes``) x (support + query).

        Example:
            >>> FewShotConfig(n_way=5, k_shot=2, n_query=3).episode_size(num_classes=4)
            20
        """
        n_way = min(self.n_way, num_classes) if num_classes else self.n_way
        return n_way * (self.k_shot + self.n_query)

    def sized(self, n_train: int, num_classes: int, has_val: bool
              ) -> tuple[FewShotConfig, str]:
        """This config with the episodes per epoch and the patience settled for
        ``n_train`` training crops of ``num_classes`` classes, and a line saying what was
        chosen and why (given values are kept).

        Example:
            >>> cfg, line = FewShotConfig().sized(1432, 6, has_val=True)
            >>> cfg.episodes, cfg.patience
            (100, 3)
        """
        if self.episodes is not None:
            episodes, why = self.episodes, "--episodes given"
        else:
            episodes = DEFAULT_EPISODES
            why = (f"the default for {n_train} training crops of {num_classes} classes; fewer "
                   "lose accuracy on the seen classes")
        if self.patience is not None:
            patience, stop = self.patience, (f"--patience {self.patience} given"
                                             if self.patience else "no early stopping (0)")
        else:
            patience = DEFAULT_PATIENCE if has_val else 0
            stop = (f"stop after {patience} epochs without a better validation gallery "
                    f"accuracy, best epoch kept" if has_val else
                    "no validation split: no early stopping, the last epoch kept")
        line = (f"schedule: {episodes} episodes per epoch ({why}), at most {self.epochs} "
                f"epochs; {stop}")
        return replace(self, episodes=episodes, patience=patience), line

    def train_config(self, num_classes: int | None = None) -> TrainConfig:
        """The common loop's configuration of this run: one episode per optimisation step
        (``episodes`` steps an epoch), AdamW, warm-up over the first 5% of the steps then
        cosine to zero, the best epoch by validation (gallery) accuracy.

        Example:
            >>> tc = FewShotConfig(epochs=4, n_way=5, k_shot=1, n_query=1).train_config()
            >>> tc.batch_size, tc.schedule, tc.augment
            (10, 'cosine', 'flip')
        """
        return TrainConfig(
            model="siamese", model_kwargs=self.encoder_kwargs(),
            img_size=self.img_size or EPISODIC_SIZE,
            in_chans=self.in_chans, scaling=self.scaling, epochs=self.epochs,
            batch_size=self.episode_size(num_classes), lr=self.lr,
            weight_decay=self.weight_decay, val_frac=self.val_frac, test_frac=0.0,
            select_metric="val_accuracy", augment=_AUGMENT_POLICY.get(self.augment, "none"),
            seed=self.seed, num_threads=self.num_threads, decode_workers=self.decode_workers,
            optimizer="adamw", schedule="cosine", warmup_epochs=self.epochs / 20,
            patience=DEFAULT_PATIENCE if self.patience is None else self.patience,
            checkpoint_every=self.checkpoint_every,
            pretrained="none", calibrate=False, ood=False)
