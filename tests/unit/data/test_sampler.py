from collections import Counter

import pytest

from drpruning.data.sampler import MixtureSampler, continue_stream, save_stream


def test_empirical_frequencies_follow_proportions():
    s = MixtureSampler([500, 500, 500], seed=1)
    p = [0.6, 0.3, 0.1]
    counts = Counter(d for _ in range(200) for d, _ in s.next_batch(p, 16))
    n = 200 * 16
    for d in range(3):
        # binomial standard deviation is at most sqrt(0.25 / 3200) ~ 0.009; 4 sigma
        assert abs(counts[d] / n - p[d]) < 0.036


def test_proportions_can_change_every_step():
    s = MixtureSampler([100, 100], seed=0)
    assert {d for d, _ in s.next_batch([1.0, 0.0], 8)} == {0}
    assert {d for d, _ in s.next_batch([0.0, 1.0], 8)} == {1}


def test_no_reuse_until_exhausted_then_cycles(caplog):
    s = MixtureSampler([10, 5], seed=0, names=["a", "b"])
    first = [i for d, i in s.next_batch([0.0, 1.0], 5)]
    assert sorted(first) == list(range(5))
    with caplog.at_level("WARNING"):
        again = [i for d, i in s.next_batch([0.0, 1.0], 5)]
        s.next_batch([0.0, 1.0], 5)
    assert sorted(again) == list(range(5))
    assert sum("exhausted" in r.message for r in caplog.records) == 1


def test_state_dict_resumes_exactly():
    a = MixtureSampler([7, 9, 11], seed=3)
    p = [0.2, 0.5, 0.3]
    for _ in range(5):
        a.next_batch(p, 4)
    state = a.state_dict()
    expected = [a.next_batch(p, 4) for _ in range(10)]
    b = MixtureSampler([7, 9, 11], seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(p, 4) for _ in range(10)] == expected


def test_state_for_other_data_is_refused():
    a = MixtureSampler([7, 9], seed=3)
    with pytest.raises(ValueError, match="data changed"):
        MixtureSampler([7, 8], seed=3).load_state_dict(a.state_dict())


def test_shards_do_not_overlap():
    s = MixtureSampler([50, 50], seed=0)
    batch = s.next_batch([0.5, 0.5], 8)
    shards = [batch[r::2] for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(batch) and not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffled_index_is_a_permutation(n):
    from drpruning.data.sampler import permutation_keys, shuffled_index

    keys = permutation_keys(5, 1, 0)
    assert sorted(shuffled_index(i, n, keys) for i in range(n)) == list(range(n))


def test_permutation_is_shuffled_and_differs_per_epoch():
    from drpruning.data.sampler import permutation_keys, shuffled_index

    n = 1000
    a = [shuffled_index(i, n, permutation_keys(0, 0, 0)) for i in range(n)]
    b = [shuffled_index(i, n, permutation_keys(0, 0, 1)) for i in range(n)]
    assert a != b
    # far from the identity: few fixed points (a random permutation has ~1) and no long sorted runs
    assert sum(x == i for i, x in enumerate(a)) < 10
    assert sum(a[i] < a[i + 1] for i in range(n - 1)) < 0.6 * n


def test_sampler_memory_does_not_grow_with_domain_size():
    import sys

    s = MixtureSampler([10**12], seed=0)  # a trillion sequences: a stored permutation would need 8 TB
    batch = s.next_batch([1.0], 4)
    assert len({i for _, i in batch}) == 4 and all(0 <= i < 10**12 for _, i in batch)
    assert sys.getsizeof(s._keys[0]) < 1000


def test_a_continued_stream_reads_on_where_the_first_run_stopped(tmp_path):
    first = MixtureSampler([7, 50], seed=3, names=["a", "b"])
    seen = first.next_batch([0.5, 0.5], 20)
    save_stream(first, tmp_path)
    # what the first run's permutation holds next, domain by domain: its own continuation is the reference
    reference = MixtureSampler([7, 50], seed=3, names=["a", "b"])
    reference.load_state_dict(first.state_dict())
    expected = {d: [reference._take(d) for _ in range(5)] for d in (0, 1)}
    second = MixtureSampler([7, 50], seed=3, names=["a", "b"])
    continue_stream(second, tmp_path)
    assert {d: [second._take(d) for _ in range(5)] for d in (0, 1)} == expected
    # domain b (50 windows) is not exhausted: none of its next windows were read by the first run
    assert not set(expected[1]) & {i for d, i in seen if d == 1}


def test_a_stream_of_another_seed_or_size_starts_afresh(tmp_path):
    first = MixtureSampler([7, 50], seed=3, names=["a", "b"])
    first.next_batch([0.5, 0.5], 20)
    save_stream(first, tmp_path)
    other_seed = MixtureSampler([7, 50], seed=4, names=["a", "b"])
    continue_stream(other_seed, tmp_path)
    assert other_seed.position == [0, 0]
    other_size = MixtureSampler([7, 51], seed=3, names=["a", "b"])
    continue_stream(other_size, tmp_path)
    assert other_size.position == [first.position[0], 0]  # a kept its size and continues; b starts afresh
    absent = MixtureSampler([7, 50], seed=3, names=["a", "b"])
    continue_stream(absent, tmp_path / "no-stream-here")
    assert absent.position == [0, 0]
