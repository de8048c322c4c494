"""gather_on_main: the evaluators' collection of per-process results (single process: the distributed code path
with a world of one)."""

from part_distillation.evaluation.distributed import gather_on_main


def test_gather_on_main_single_process():
    items = [{"a": 1}, {"b": 2}]
    assert gather_on_main(items, distributed=False) is items
    gathered = gather_on_main(items, distributed=True)  # world size 1: this process is the main one
    assert gathered == items and gathered is not items
    assert sum(gather_on_main([3], distributed=True)) == 3
