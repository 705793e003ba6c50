"""What each ``imgtriage gallery`` edit can be told, each as one frozen record: ``rule`` /
``set_rule``, ``create`` / ``create_gallery``, ``add`` / ``enrol_images``, ``remove`` /
``remove_items``, ``list`` / ``describe_gallery``, ``fit-threshold`` / ``fit_threshold``, and
where the new version goes.

Each field carries its ``--help`` text in ``metadata["help"]`` (``cli/_options.py`` builds the
command's options from them); errors name the CLI flag that sets the value. No heavy imports
here: the CLI imports this module at start-up.

Example:
    >>> GalleryRuleChange(method="knn", knn_k=3).changes()
    {'method': 'knn', 'k': 3}
    >>> GalleryRuleChange(clear_threshold=True).changes()
    {'similarity_threshold': None}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError

METHODS = ("prototype", "knn")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class GalleryRuleChange:
    """A change to a gallery's scoring rule; None leaves that part as it is
    (``clear_threshold`` wins over ``similarity_threshold``)."""

    similarity_threshold: float | None = _f(None, "Best-class cosine similarity below which "
                                                  "the answer is unknown.")
    clear_threshold: bool = _f(False, "Never abstain.", flag="--no-threshold", switch=True)
    method: str | None = _f(None, "prototype or knn (a fitted scale is refitted).")
    knn_k: int | None = _f(None, "Neighbours per class for knn (a fitted scale is refitted).")
    scale: float | None = _f(None, "Logit scale on the similarities, fixed: later edits keep "
                                   "it instead of refitting it.")
    fit_scale: bool = _f(False, "Fit the scale again on the enrolled items held out in turn "
                                "(kept when it lowers their NLL); edits refit it from then "
                                "on.", switch=True)

    def __post_init__(self) -> None:
        if self.method not in (None, *METHODS):
            raise ConfigError(f"method must be prototype or knn, got {self.method!r} "
                              "(--method)")
        if self.knn_k is not None and self.knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {self.knn_k} (--knn-k)")
        _check_scale(self.scale)
        if self.scale is not None and self.fit_scale:
            raise ConfigError("give --scale or --fit-scale, not both")

    def changes(self) -> dict[str, Any]:
        """The ``GalleryConfig`` fields this change sets."""
        out: dict[str, Any] = {k: v for k, v in (("similarity_threshold",
                                                   self.similarity_threshold),
                                                  ("method", self.method), ("k", self.knn_k),
                                                  ("scale", self.scale))
                               if v is not None}
        if self.clear_threshold:
            out["similarity_threshold"] = None
        return out


@dataclass(frozen=True)
class GalleryCreateConfig:
    """How ``imgtriage gallery create`` / ``create_gallery`` scores the new gallery: its rule,
    and optionally a similarity threshold fitted on the enrolled images (``acceptance``)
    instead of one given.

    Example:
        >>> GalleryCreateConfig(method="knn", knn_k=3).gallery()
        GalleryConfig(method='knn', k=3, scale=10.0, similarity_threshold=None)
    """

    method: str = _f("prototype", "prototype or knn.")
    knn_k: int = _f(1, "Neighbours per class for knn.")
    similarity_threshold: float | None = _f(None, "Abstain below this similarity.")
    acceptance: float | None = _f(None, "Instead: fit the threshold on the enrolled images, "
                                        "each held out in turn, keeping this share of those "
                                        "answered correctly (e.g. 0.95).")
    scale: float | None = _f(None, "Logit scale on the similarities. Not given: fitted like "
                                   "a temperature on the enrolled images held out in turn "
                                   "(kept when it lowers their NLL; 10 otherwise) and "
                                   "refitted by later edits; given: fixed.")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be prototype or knn, got {self.method!r} "
                              "(--method)")
        if self.knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {self.knn_k} (--knn-k)")
        if self.acceptance is not None and self.similarity_threshold is not None:
            raise ConfigError("give --similarity-threshold or --acceptance, not both")
        _check_scale(self.scale)

    def gallery(self) -> Any:
        """The rule as ``imgtriage.models.gallery.GalleryConfig`` (the threshold as given;
        the scale as given, else the default the fit starts from)."""
        from imgtriage.models.gallery import GalleryConfig

        extra = {"scale": self.scale} if self.scale is not None else {}
        return GalleryConfig(method=self.method, k=self.knn_k,
                             similarity_threshold=self.similarity_threshold, **extra)


def _check_scale(scale: float | None) -> None:
    if scale is not None and not scale > 0:
        raise ConfigError(f"scale must be a positive number, got {scale} (--scale)")


def _required(help: str, **meta: Any) -> Any:
    return field(metadata={"help": help, **meta})


@dataclass(frozen=True)
class GalleryOutput:
    """Where an edit writes the new version (None: it replaces the bundle; the history is
    kept either way)."""

    out: Path | None = field(default=None, metadata={
        "help": "Write the new version here instead of replacing BUNDLE (history is kept "
                "either way).", "short": "-o"})


@dataclass(frozen=True)
class NewGalleryOutput:
    """Where ``create_gallery`` writes the new gallery bundle."""

    out: Path = field(metadata={"help": "The new gallery bundle.", "short": "-o"})


@dataclass(frozen=True)
class GalleryAdd:
    """Which class ``enrol_images`` enrols the images into."""

    label: str = _required("Class to enrol them into (a new class when absent).", short="-l")


@dataclass(frozen=True)
class GalleryRemoval:
    """What ``remove_items`` drops: a whole class, or only some of its items."""

    label: str = _required("Class to remove (or to remove items from).", short="-l")
    images: tuple[str, ...] = _f((), "Only these items (enrolled path or file name); "
                                     "repeatable.", repeat=True)


@dataclass(frozen=True)
class GalleryListing:
    """What ``imgtriage gallery list`` prints besides the classes and the rule."""

    items: bool = _f(False, "Also list every enrolled item.", switch=True)
    as_json: bool = _f(False, "Print JSON.", flag="--json", switch=True)


@dataclass(frozen=True)
class GalleryThresholdFit:
    """How ``fit_threshold`` fits the similarity threshold on the enrolled items."""

    acceptance: float = _f(0.95, "Share of the held-out enrolled items answered correctly "
                                 "that the threshold keeps.")
