"""Post-hoc OOD scores compared on the same trained model (how ``knn+rmd`` was chosen).

For a run directory of ``bench_ood.py`` (``OUT/TASK-sSEED/run``: bundle + splits.csv), the
torch model's logits and the global-average-pooled output of every conv block (the last =
the penultimate features) are taken for the training images (and three augmented views:
flip, two shifts), the validation images, the ID test images and the task's OOD sets; then
AUROC / FPR@95TPR (ID test vs each OOD set) of: MSP, energy, max logit, k-NN (k = 1-50, on
the normalised features; Sun et al. 2022) with the plain, augmented-view and class-conditional
bank, Mahalanobis (raw; normalised with Ledoit-Wolf shrinkage), relative Mahalanobis (Ren et
al. 2021), ViM (Wang et al. 2022), k-NN / Mahalanobis on earlier blocks and on the blocks
joined, k-NN in whitened space, and fusions (validation-ECDF mean/max of k-NN with energy,
MSP, Mahalanobis; of the blocks' k-NN), and the bundle's own fused score (``knn+rmd``). For
``crop_cnn`` models (the blocks are ``model.features``). No timing: no lock needed.

The calibration line: temperature fitted on validation (the bundle's), on test itself, on
``AUG_VIEWS`` views of validation under the run's own training augmentation (and on both),
the validation temperature capped by the rule of succession (``_t_laplace``), and vector
scaling; test ECE / NLL of each.

Usage:
    .venv/bin/python bench/bench_ood_candidates.py /tmp/oodbench-s0/mstar6-s0/run mstar6
    .venv/bin/python bench/bench_ood_candidates.py RUN mstar --calibration-only
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ood as B


def _tap(model: Any, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    outs: list[Any] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.mean(dim=(2, 3))))
             for b in model.features]
    with torch.inference_mode():
        lo = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + 256]))).float().numpy()
              for i in range(0, len(x), 256)]
    for h in hooks:
        h.remove()
    n = len(model.features)
    return np.concatenate(lo), [np.concatenate([outs[j].numpy() for j in range(b, len(outs), n)])
                                for b in range(n)]


def extract(run: Path, task: str, work: Path, calibration_only: bool = False
            ) -> dict[str, Any]:
    from imgtriage.data import discover
    from imgtriage.predict import Predictor

    p = Predictor.load(run / "bundle", backend="torch", num_threads=2)
    model = p.backend.model.eval()
    samples = discover(run / "splits.csv").samples
    sets = {sp: ([s.path for s in samples if s.split == sp],
                 np.array([p.classes.index(s.label) for s in samples if s.split == sp]))
            for sp in (("val",) if calibration_only else ("train", "val"))}
    if task == "fashion":
        test = B._fashion(work / "fashion-data", 600)[1]
        ood = {"digits": B._digits(work / "digits")}
    else:
        tf = B._files(B.MSTAR / "test")
        test = [(f, c) for c in p.classes for f in tf[c]]
        ood = ({"other4": [f for c in sorted(tf) if c not in p.classes for f in tf[c]]}
               if task == "mstar6" else
               {"cifar10": sorted((B.SHARED / "cifar10-small" / "test").rglob("*.jpg")),
                "sirst": sorted((B.SHARED / "sirst-infrared").glob("*.png")),
                "noise": B._noise(work / "noise")})
    sets["test"] = ([f for f, _ in test], np.array([p.classes.index(c) for _, c in test]))
    if not calibration_only:
        sets.update({"ood_" + k: (v, np.full(len(v), -1)) for k, v in ood.items()})
    z: dict[str, Any] = {"W": model.head.weight.detach().numpy(),
                         "b": model.head.bias.detach().numpy(), "T": p.policy.temperature,
                         "scorer": p.ood_scorer(p.policy.ood)}
    for name, (paths, y) in sets.items():
        x = B._inputs(p, paths)
        z[name] = (*_tap(model, x), y)
        if name == "val":
            z["val_aug"] = _augmented_logits(model, x, run)
        if name == "train":
            for v, xv in (("flip", x[..., ::-1]), ("shl", np.roll(x, 3, axis=-1)),
                          ("shu", np.roll(x, -3, axis=-2))):
                z["train_" + v] = (*_tap(model, np.ascontiguousarray(xv)), y)
    return z


AUG_VIEWS = 4


def _augmented_logits(model: Any, x: np.ndarray, run: Path) -> np.ndarray:
    """Logits of ``AUG_VIEWS`` views of ``x`` under the run's own training augmentation
    (``config.json``: --augment, --aug-strength, --modality; the plain images when it was
    none), stacked (views, N, C): a temperature fitted on them has seen the kind of change
    the augmentation stands for (Tomani et al. 2021 perturb the validation set for
    calibration under drift)."""
    import json

    import torch

    from imgtriage.data.augment import AugmentPolicy
    from imgtriage.train.config import MODALITIES

    cfg = json.loads((run / "config.json").read_text())
    pol = AugmentPolicy(cfg.get("augment", "none"), float(cfg.get("aug_strength", 0.5)),
                        int(cfg.get("aug_ops", 2)), MODALITIES[cfg.get("modality", "generic")])
    g = torch.Generator().manual_seed(0)
    views = []
    for _ in range(AUG_VIEWS):
        xv = pol(torch.from_numpy(np.ascontiguousarray(x)), None, g)
        views.append(_tap(model, np.ascontiguousarray(xv.numpy()))[0])
    return np.stack(views)


def _nrm(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _knn(bank: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    from imgtriage.evaluate.ood import knn_distance

    return knn_distance(_nrm(q).astype(np.float32), _nrm(bank).astype(np.float32), k)


def _knn_cc(bank: np.ndarray, by: np.ndarray, q: np.ndarray, pred: np.ndarray, k: int
            ) -> np.ndarray:
    out = np.full(len(q), 2.0)
    for c in np.unique(by):
        if (pred == c).any():
            out[pred == c] = _knn(bank[by == c], q[pred == c], k)
    return out


def _maha(tr: np.ndarray, ty: np.ndarray, q: np.ndarray, norm: bool = True,
          relative: bool = False) -> np.ndarray:
    from sklearn.covariance import ledoit_wolf

    f, g = (_nrm(tr), _nrm(q)) if norm else (tr, q)
    mu = np.stack([f[ty == c].mean(0) for c in np.unique(ty)])
    cen = f - mu[np.searchsorted(np.unique(ty), ty)]
    cov = ledoit_wolf(cen, assume_centered=True)[0] if norm else \
        cen.T @ cen / len(f) + 1e-6 * np.eye(f.shape[1])
    prec = np.linalg.pinv(cov)
    d = np.stack([np.einsum("ij,jk,ik->i", g - m, prec, g - m) for m in mu], 1)
    if relative:
        m0 = f.mean(0)
        p0 = np.linalg.pinv(ledoit_wolf(f - m0, assume_centered=True)[0])
        d = d - np.einsum("ij,jk,ik->i", g - m0, p0, g - m0)[:, None]
    return d.min(1)


def _vim(tr: np.ndarray, trl: np.ndarray, w: np.ndarray, b: np.ndarray, q: np.ndarray,
         ql: np.ndarray) -> np.ndarray:
    from scipy.special import logsumexp

    u = -np.linalg.pinv(w) @ b
    dim = tr.shape[1] // 2
    ev, vec = np.linalg.eigh((tr - u).T @ (tr - u) / len(tr))
    ns = vec[:, np.argsort(ev)[::-1][dim:]]
    alpha = trl.max(1).mean() / np.linalg.norm((tr - u) @ ns, axis=1).mean()
    vl = np.linalg.norm((q - u) @ ns, axis=1) * alpha
    return vl - logsumexp(ql, axis=1)


def _fuse(val: list[np.ndarray], s: list[np.ndarray], how: str) -> np.ndarray:
    p = np.stack([np.searchsorted(np.sort(v), x, side="right") / (len(v) + 1)
                  for v, x in zip(val, s, strict=True)])
    return p.mean(0) if how == "mean" else p.max(0)


def candidates(z: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    from scipy.special import logsumexp, softmax

    from imgtriage.evaluate.ood import auroc_fpr

    t, last = float(z["T"]), len(z["train"][1]) - 1
    trl, trf, ty = z["train"]
    aug = np.concatenate([trf[last]] + [z["train_" + v][1][last] for v in ("flip", "shl", "shu")])
    sets = ["val", "test"] + [k for k in z if k.startswith("ood_")]
    feat = {s: z[s][1][last] for s in sets}
    lg = {s: z[s][0] for s in sets}
    fns: dict[str, Any] = {
        "msp": lambda s: -softmax(lg[s] / t, 1).max(1),
        "energy": lambda s: -t * logsumexp(lg[s] / t, 1),
        "maxlogit": lambda s: -lg[s].max(1),
        **{f"knn{k}": (lambda s, k=k: _knn(trf[last], feat[s], k)) for k in (1, 5, 10, 20, 50)},
        "knn10_augbank": lambda s: _knn(aug, feat[s], 10),
        "knn10_classcond": lambda s: _knn_cc(trf[last], ty, feat[s], lg[s].argmax(1), 10),
        "maha_raw": lambda s: _maha(trf[last], ty, feat[s], norm=False),
        "maha_norm_lw": lambda s: _maha(trf[last], ty, feat[s]),
        "rmd_norm_lw": lambda s: _maha(trf[last], ty, feat[s], relative=True),
        "vim": lambda s: _vim(trf[last], trl, z["W"], z["b"], feat[s], lg[s]),
        "knn10_blocks_joined": lambda s: _knn(
            np.concatenate([_nrm(f) for f in trf], 1),
            np.concatenate([_nrm(f) for f in z[s][1]], 1), 10),
        "bundle_knn+rmd": lambda s: z["scorer"].score(feat[s]),
    }
    for b in range(last):
        fns[f"knn10_block-{last - b}"] = lambda s, b=b: _knn(trf[b], z[s][1][b], 10)
        fns[f"maha_block-{last - b}"] = lambda s, b=b: _maha(trf[b], ty, z[s][1][b])
    sc = {m: {s: fn(s) for s in sets} for m, fn in fns.items()}
    fusions = {"ecdf_mean_knn_energy": (["knn10", "energy"], "mean"),
               "ecdf_mean_knn_msp": (["knn10", "msp"], "mean"),
               "ecdf_mean_knn_maha": (["knn10", "maha_norm_lw"], "mean"),
               "ecdf_max_knn_rmd": (["knn10", "rmd_norm_lw"], "max"),
               "ecdf_max_blocks_knn": ([m for m in sc if m.startswith("knn10_block")]
                                       + ["knn10"], "max")}
    for name, (parts, how) in fusions.items():
        sc[name] = {s: _fuse([sc[m]["val"] for m in parts], [sc[m][s] for m in parts], how)
                    for s in sets}
    return {m: {s[4:]: auroc_fpr(d["test"], d[s]) for s in sets if s.startswith("ood_")}
            for m, d in sc.items()}


def _vector_scaling(z: np.ndarray, y: np.ndarray, reg: float = 1e-2) -> Any:
    """Per-class scale and bias on the logits (Guo et al. 2017), L2-regularised, by NLL."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    c = z.shape[1]

    def nll(p: np.ndarray) -> float:
        zz = z * np.exp(p[:c]) + p[c:]
        return float(-log_softmax(zz, 1)[np.arange(len(y)), y].mean() + reg * (p @ p))

    p = minimize(nll, np.zeros(2 * c), method="L-BFGS-B").x
    return lambda zz: zz * np.exp(p[:c]) + p[c:]


def _t_laplace(lo: np.ndarray, y: np.ndarray, t: float) -> float:
    """``t`` raised, when needed, until the mean top-class confidence on (``lo``, ``y``) is at
    most the rule-of-succession accuracy (right + 1) / (n + 2): on a (nearly) separable
    validation split the NLL keeps falling as T -> 0, and the MLE says "always certain"."""
    from scipy.optimize import brentq
    from scipy.special import softmax

    bound = ((lo.argmax(1) == y).sum() + 1) / (len(y) + 2)

    def gap(log_t: float) -> float:
        return float(softmax(lo / np.exp(log_t), 1).max(1).mean() - bound)

    if gap(np.log(t)) <= 0:
        return t
    return float(np.exp(brentq(gap, np.log(t), np.log(100.0))))


def calibration(z: dict[str, Any]) -> dict[str, float]:
    """Why is the default bundle's ECE on test what it is? Temperature fitted on validation
    (the bundle's), on test itself (the best one temperature can do), a perfectly calibrated
    model's ECE on as many images (the estimator's floor), and vector scaling fitted on
    validation, with its 5-fold cross-validated validation NLL gain over temperature."""
    from scipy.special import log_softmax, softmax

    from imgtriage.evaluate import TemperatureScaler, expected_calibration_error

    (vl, _, vy), (tl, _, ty) = z["val"], z["test"]

    def nll(lo: np.ndarray, y: np.ndarray) -> float:
        return float(-log_softmax(lo, 1)[np.arange(len(y)), y].mean())

    t_val, t_test = (TemperatureScaler().fit(lo, y).temperature_ for lo, y in ((vl, vy), (tl, ty)))
    folds = np.array_split(np.random.default_rng(0).permutation(len(vy)), 5)
    gain = []
    for f in folds:
        tr = np.setdiff1d(np.arange(len(vy)), f)
        t_f = TemperatureScaler().fit(vl[tr], vy[tr]).temperature_
        gain.append(nll(vl[f] / t_f, vy[f]) - nll(_vector_scaling(vl[tr], vy[tr])(vl[f]), vy[f]))
    vs = _vector_scaling(vl, vy)
    va = z["val_aug"]
    t_aug = TemperatureScaler().fit(va.reshape(-1, va.shape[-1]), np.tile(vy, len(va))
                                    ).temperature_
    t_both = TemperatureScaler().fit(np.concatenate([vl, va.reshape(-1, va.shape[-1])]),
                                     np.tile(vy, len(va) + 1)).temperature_
    t_lap = _t_laplace(vl, vy, t_val)
    probs = softmax(tl / t_val, 1)
    rng = np.random.default_rng(0)
    top, conf = probs.argmax(1), probs.max(1)
    floor = np.median([expected_calibration_error(probs, np.where(
        rng.random(len(conf)) < conf, top, (top + 1) % probs.shape[1])) for _ in range(200)])
    return {"n_val": len(vy), "val_acc": float((vl.argmax(1) == vy).mean()),
            "test_acc": float((tl.argmax(1) == ty).mean()), "T_val": t_val, "T_test": t_test,
            "ece_test_T_val": expected_calibration_error(probs, ty),
            "ece_test_T_test": expected_calibration_error(softmax(tl / t_test, 1), ty),
            "ece_floor": float(floor), "nll_test_T_val": nll(tl / t_val, ty),
            "ece_test_vector": expected_calibration_error(softmax(vs(tl), 1), ty),
            "nll_test_vector": nll(vs(tl), ty), "cv_val_nll_gain_vector": float(np.mean(gain)),
            "val_aug_acc": float((va.argmax(-1) == vy).mean()), "T_val_aug": t_aug,
            "ece_test_T_val_aug": expected_calibration_error(softmax(tl / t_aug, 1), ty),
            "nll_test_T_val_aug": nll(tl / t_aug, ty), "T_val_and_aug": t_both,
            "ece_test_T_val_and_aug": expected_calibration_error(softmax(tl / t_both, 1), ty),
            "T_val_laplace": t_lap,
            "ece_test_T_val_laplace": expected_calibration_error(softmax(tl / t_lap, 1), ty)}


def main() -> None:
    run, task = Path(sys.argv[1]), sys.argv[2]
    only = "--calibration-only" in sys.argv[3:]
    z = extract(run, task, run.parent.parent, only)
    print("calibration " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in calibration(z).items()), flush=True)
    if only:
        return
    res = candidates(z)
    for m, per in res.items():
        print(f"{m:24s} " + "  ".join(f"{o} {v['auroc']:.3f}/{v['fpr_at_95tpr']:.3f}"
                                      for o, v in per.items()), flush=True)


if __name__ == "__main__":
    main()
