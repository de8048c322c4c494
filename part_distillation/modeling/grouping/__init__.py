"""Kept for compatibility: K-means and the dense CRF moved to :mod:`part_distillation.clustering`.

``part_distillation.modeling.grouping``, ``.grouping.kmeans`` and ``.grouping.crf`` still import (the
submodules are aliases of :mod:`part_distillation.clustering.kmeans` and ``.crf``, the same module objects,
so patching one patches the other). New code imports :mod:`part_distillation.clustering`. The old files are
not kept as shims so that git follows the moved files (a file left at the old path stops rename detection).
"""

import sys

from ...clustering import crf, kmeans  # noqa: F401
from ...clustering.crf import DenseCRFRefiner, PermutohedralLattice, unary_from_labels, unary_from_probs  # noqa: F401
from ...clustering.kmeans import KMeansResult, assign, batched_kmeans, pairwise_distance, soft_assign  # noqa: F401

sys.modules[__name__ + ".kmeans"] = kmeans
sys.modules[__name__ + ".crf"] = crf
