"""What the evaluators share to collect their per-process results on the main process."""

import itertools

from detectron2.utils import comm

__all__ = ["gather_on_main"]


def gather_on_main(items: list, distributed: bool):
    """Every process's ``items`` concatenated in rank order on the main process, None on the others (every process
    must call it: it synchronises them). Without ``distributed``: ``items`` itself."""
    if not distributed:
        return items
    comm.synchronize()
    gathered = comm.gather(items, dst=0)
    if not comm.is_main_process():
        return None
    return list(itertools.chain(*gathered))
