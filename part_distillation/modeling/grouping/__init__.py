"""Feature grouping: the batched K-means shared by pixel grouping, part ranking and evaluation."""
from .kmeans import KMeansResult, assign, batched_kmeans, pairwise_distance, soft_assign  # noqa: F401
