"""Clustering shared by models, evaluators and the labelling drivers (no model code, no data loading).

* :mod:`.kmeans`: batched K-means in torch (many small problems at once) and distances/assignment to given
  centers; :mod:`.kmeans_lloyd` holds its Lloyd iterations.
* :mod:`.crf`: the dense CRF that snaps part segments to image edges (torch or pydensecrf backend);
  :mod:`.crf_mean_field` holds its torch backend's mean-field and :mod:`.permutohedral` the permutohedral lattice.
* :mod:`.prototypes`: per-object-class clustering of part features and the prototypes file.

It imports only :mod:`part_distillation.structures` and :mod:`part_distillation.utils` from the package.
"""

from .crf import DenseCRFRefiner, PermutohedralLattice, unary_from_labels, unary_from_probs  # noqa: F401
from .kmeans import KMeansResult, assign, batched_kmeans, pairwise_distance, soft_assign  # noqa: F401
