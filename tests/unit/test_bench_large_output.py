"""The large-output benchmark runs end to end with a few MiB (no timings asserted)."""

from bench import large_output


def test_both_approaches_store_every_byte_in_their_own_process():
    results = large_output.run(size_mb=3, repeat=2)
    assert [r.approach for r in results] == ["streaming", "naive"]
    for r in results:
        assert r.stored_bytes == r.size_bytes == 3 * 1024 * 1024
        assert r.seconds > 0 and r.runs == 2
        assert r.peak_rss_mb >= r.baseline_rss_mb > 0
