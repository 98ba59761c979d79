"""Benchmark of the PCA + Ridge baseline's read-out at the paper's size (prints numbers; not
a test).

The paper config's ``pca_ridge`` cells read the normalised voxels themselves: at
``normalise.resolution_mm: 2`` one channel is 99 x 117 x 95 = 1.1 M features for about 250
training subjects. This fits :func:`brainage.readout.fit_pca_ridge` (3 component counts x 5
alphas, 5-fold CV, then the out-of-fold age-bias fit's 5 refits, as evaluate_encoder does)
on random float32 voxels of that size and prints wall time and peak memory; with
``--sklearn`` also one fit of the ``PCA(svd_solver="full")`` that scikit-learn's grid search
refitted 76 times per read-out before (and 76 times per fold of the age-bias fit).

Usage::

    PYTHONPATH=workflow .venv/bin/python tests/benchmarks/bench_readout.py \
        [--subjects 249] [--voxels 1100000] [--sklearn]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=249)
    parser.add_argument("--voxels", type=int, default=99 * 117 * 95)
    parser.add_argument("--sklearn", action="store_true",
                        help="also time one full PCA fit as scikit-learn's pipeline ran it")
    arguments = parser.parse_args()

    from brainage.agebias import out_of_fold_predictions
    from brainage.readout import fit_pca_ridge

    print(f"CPU: {platform.processor() or platform.machine()}; "
          f"{arguments.subjects} subjects x {arguments.voxels} voxels (float32)")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((arguments.subjects, arguments.voxels), dtype=np.float32)
    ages = 20 + 60 * rng.random(arguments.subjects)
    print(f"features: {features.nbytes / 1e9:.2f} GB; peak so far {peak_gb():.2f} GB")
    settings = {"method": "pca_ridge", "pca_components": [5, 10, 20],
                "alphas": [0.01, 0.1, 1.0, 10.0, 100.0], "cv_folds": 5}
    started = time.perf_counter()
    readout = fit_pca_ridge(features, ages, components=settings["pca_components"],
                            alphas=settings["alphas"], cv_folds=5)
    print(f"fit_pca_ridge: {time.perf_counter() - started:.1f} s ({readout.info}); "
          f"peak {peak_gb():.2f} GB")
    started = time.perf_counter()
    out_of_fold_predictions(features, ages, settings, folds=5, seed=0)
    print(f"out-of-fold age-bias fit (5 refits): {time.perf_counter() - started:.1f} s; "
          f"peak {peak_gb():.2f} GB")
    if arguments.sklearn:
        from sklearn.decomposition import PCA

        started = time.perf_counter()
        PCA(n_components=20, svd_solver="full").fit(features.astype(np.float64))
        print(f"one scikit-learn PCA(svd_solver='full') fit: "
              f"{time.perf_counter() - started:.1f} s; peak {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
