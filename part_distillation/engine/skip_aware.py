"""Evaluation that accounts for unreadable images instead of substituting or crashing.

The test loader (``data.build.build_detection_test_loader``) yields ``{"skipped": reason, ...}`` for an image
the mapper could not use (detectron2's would silently evaluate a random other image in its place).
:class:`SkipAwareModel` runs the model on the other inputs of the batch; :class:`SkipCountingEvaluator`
hands the evaluator only the evaluated images and adds ``num_images_skipped`` to each task's results.

The rule, the same for every evaluator and for stage-1 and stage-2 AR: a skipped image is left out of the
metric entirely (its ground truth too), and the number of such images is reported next to the metric.
"""

import copy

from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm
from torch import nn

__all__ = ["SkipAwareModel", "SkipCountingEvaluator"]


class SkipAwareModel(nn.Module):
    """Runs the model on the readable inputs of a batch; skipped inputs get an empty output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        keep = [x for x in batched_inputs if not x.get("skipped")]
        outputs = iter(self.model(keep) if keep else [])
        return [{} if x.get("skipped") else next(outputs) for x in batched_inputs]


class SkipCountingEvaluator(DatasetEvaluator):
    """Forwards the evaluated images to ``evaluator``; counts the skipped ones (module doc: the rule)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.skipped = 0

    def reset(self):
        self.skipped = 0
        self.evaluator.reset()

    def process(self, inputs, outputs):
        pairs = [(i, o) for i, o in zip(inputs, outputs) if not i.get("skipped")]
        self.skipped += len(inputs) - len(pairs)
        if pairs:
            self.evaluator.process([i for i, _ in pairs], [o for _, o in pairs])

    def evaluate(self):
        skipped = sum(comm.all_gather(self.skipped)) if comm.get_world_size() > 1 else self.skipped
        results = self.evaluator.evaluate()
        if not results:
            return results
        results = copy.copy(results)
        for task, metrics in results.items():
            if isinstance(metrics, dict):
                results[task] = dict(metrics, num_images_skipped=skipped)
        return results


def wrap_evaluators(evaluators):
    """``SkipCountingEvaluator`` around an evaluator (or each of a ``DatasetEvaluators``' members)."""
    if evaluators is None or isinstance(evaluators, SkipCountingEvaluator):
        return evaluators
    if isinstance(evaluators, DatasetEvaluators):
        return DatasetEvaluators([wrap_evaluators(e) for e in evaluators._evaluators])
    if isinstance(evaluators, (list, tuple)):
        return [wrap_evaluators(e) for e in evaluators]
    return SkipCountingEvaluator(evaluators)
