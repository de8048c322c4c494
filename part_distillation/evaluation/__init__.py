"""Evaluators (metrics, and the writer that turns inference into pseudo-labels).

Each evaluator module registers a builder for an ``evaluator_type`` (dataset metadata) on import.
"""

from .build import EVALUATOR_BUILDERS, build_evaluator, register_evaluator  # noqa: F401
from .proposal_ar import ProposalAREvaluator  # noqa: F401
from .part_miou import PartMIoUEvaluator  # noqa: F401
from .nmi_ari import PartNMIARIEvaluator  # noqa: F401
from .keypoint_nme import KeypointNMEEvaluator  # noqa: F401
