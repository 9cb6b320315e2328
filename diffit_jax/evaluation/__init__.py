"""ADM-compatible evaluation in JAX: FID, sFID, Inception Score, precision and recall.

Reproduces openai/guided-diffusion's `evaluations/evaluator.py` (the suite behind the
DiffiT/DiT ImageNet numbers) without TensorFlow or PyTorch: the 2015-12-05 Inception
graph in Flax (`diffit_jax.models.inception`, weights from
`python -m diffit_jax.convert inception`), feature extraction sharded over devices
(`features`), the metric formulas (`metrics`), and reference statistics with caching
(`evaluator`). Command line: `python -m diffit_jax.evaluate`.

Typical use:

    from diffit_jax.evaluation import Evaluator
    evaluator = Evaluator("checkpoints/inception_fid", "VIRTUAL_imagenet256_labeled.npz",
                          cache_path="workdir/fid_reference.npz")
    scores = evaluator(sample_batches, total=50_000)  # {"fid": ..., "sfid": ..., ...}
"""

from diffit_jax.evaluation.evaluator import (Evaluator, ReferenceStats, compute_metrics,
                                             load_reference)
from diffit_jax.evaluation.features import Activations, FeatureExtractor
from diffit_jax.evaluation.metrics import (FIDStatistics, frechet_distance, inception_score,
                                           manifold_radii, precision_recall)

__all__ = [
    "Activations", "Evaluator", "FIDStatistics", "FeatureExtractor", "ReferenceStats",
    "compute_metrics", "frechet_distance", "inception_score", "load_reference",
    "manifold_radii", "precision_recall",
]
