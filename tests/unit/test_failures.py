"""The one failure vocabulary: counting with examples, bounded warnings, merging and summing over workers/ranks."""
import logging

from zvl_ds.data.failures import MAX_EXAMPLES, FailureCounter, SampleSkipped, sum_counts


def test_counter_counts_every_skip_but_keeps_few_examples():
    counter = FailureCounter()
    for i in range(MAX_EXAMPLES + 3):
        counter.add("bad_json", f"sample {i}")
    counter.add("missing_image", "x", count=4)
    counter.add("missing_image", "ignored", count=0)
    assert counter.counts == {"bad_json": MAX_EXAMPLES + 3, "missing_image": 4}
    assert counter.examples["bad_json"] == [f"sample {i}" for i in range(MAX_EXAMPLES)]
    assert counter.total == MAX_EXAMPLES + 7
    assert counter.to_json()["missing_image"] == {"count": 4, "examples": ["x"]}


def test_counter_round_trips_through_json_and_merges_within_the_example_limit():
    first, second = FailureCounter(), FailureCounter()
    for i in range(3):
        first.add("corrupt_image", f"a{i}")
        second.add("corrupt_image", f"b{i}")
    second.add("empty_file", "e")
    restored = FailureCounter.from_json(first.to_json())
    assert restored.counts == first.counts and restored.examples == first.examples
    restored.merge(second)
    assert restored.counts == {"corrupt_image": 6, "empty_file": 1}
    assert restored.examples["corrupt_image"] == ["a0", "a1", "a2", "b0", "b1"]  # MAX_EXAMPLES == 5
    assert restored.examples["empty_file"] == ["e"]


def test_loader_counter_warns_a_bounded_number_of_times_per_reason(caplog):
    counter = FailureCounter(max_warnings=2)
    with caplog.at_level(logging.WARNING, logger="zvl_ds.data"):
        for i in range(6):
            counter.add("bad_json", f"s{i}")
        counter.add("missing_caption", "m")
    messages = [record.getMessage() for record in caplog.records]
    assert sum("[bad_json]: s" in m for m in messages) == 2
    assert sum("further [bad_json] warnings are not shown" in m for m in messages) == 1
    assert sum("[missing_caption]: m" in m for m in messages) == 1
    assert counter.counts == {"bad_json": 6, "missing_caption": 1}


def test_writer_counter_does_not_log(caplog):
    with caplog.at_level(logging.DEBUG, logger="zvl_ds.data"):
        FailureCounter().add("bad_json", "quiet")
    assert caplog.records == []


def test_sum_counts_adds_reason_wise_and_tolerates_empty_parts():
    parts = [{"a": 1, "b": 2}, {}, None, {"b": 3, "c": 4}]
    assert sum_counts(parts) == {"a": 1, "b": 5, "c": 4}
    assert sum_counts([]) == {}
    original = {"a": 1}
    sum_counts([original, original])
    assert original == {"a": 1}  # inputs are not modified


def test_skip_carries_its_reason_and_message():
    error = SampleSkipped("too_many_pixels", "9000x9000")
    assert error.reason == "too_many_pixels" and str(error) == "9000x9000"


def test_skip_budget_measures_each_reason_over_the_window():
    from zvl_ds.data.failures import SkipBudget

    budget = SkipBudget(max_fraction=0.1, window=100)
    # before 100 samples were read, up to 0.1 * 100 = 10 skips of one reason pass
    assert budget.over_budget(40, {"corrupt_image": 10, "bad_json": 3}) == []
    assert budget.over_budget(60, {"corrupt_image": 11, "bad_json": 3}) == [("corrupt_image", 11, 74)]
    # reasons are judged apart: 8 + 8 = 16 skips of two reasons in 116 reads is within budget for each
    budget = SkipBudget(max_fraction=0.1, window=100)
    assert budget.over_budget(100, {"a": 8, "b": 8}) == []
    # the window moves: reads 116 -> 232 hold 116 reads with 12 - 8 = 4 and 20 - 8 = 12 skips; 12 > 11.6
    assert budget.over_budget(200, {"a": 12, "b": 20}) == [("b", 12, 116)]
    # an old burst leaves the window: from read 232 on, 2 more skips of b in 202 reads pass
    assert budget.over_budget(400, {"a": 12, "b": 22}) == []
    # a fraction of 1 never stops
    assert SkipBudget(1.0, 10).over_budget(0, {"unreadable_shard": 10 ** 6}) == []


def test_shards_named_by_the_skip_examples():
    from zvl_ds.data.failures import shards_named

    shards = {"cc3m": ["/d/cc3m/train-0.tar", "/d/cc3m/train-01.tar"], "coco": ["/d/coco/train-0.tar"]}
    examples = ["/d/cc3m/train-01.tar: FileNotFoundError: gone", "/d/coco/train-0.tar sample 'k'",
                "/d/cc3m/train-01.tar: truncated", "elsewhere"]
    assert shards_named(examples, shards) == {"cc3m": ["/d/cc3m/train-01.tar"], "coco": ["/d/coco/train-0.tar"]}
