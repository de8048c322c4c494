"""Feature grouping: the batched K-means shared by pixel grouping, part ranking and evaluation, and the dense CRF."""
from .crf import DenseCRFRefiner, PermutohedralLattice, unary_from_labels, unary_from_probs  # noqa: F401
from .kmeans import KMeansResult, assign, batched_kmeans, pairwise_distance, soft_assign  # noqa: F401
