"""The cold-start benchmark runs end to end in a tiny configuration (no timings asserted).

Uses this interpreter's own environment instead of building python3.13 packages (no network).
"""

import sys

from bench import cold_start


def test_cold_start_measures_every_mode_from_fresh_interpreters():
    result = cold_start.run(runs=1, python=sys.executable, build=False)
    assert set(result.modes) == set(cold_start.MODES)
    assert {"floor", "floor_clients", "ingest", "webhook"} <= set(result.modes)
    for mode in result.modes.values():
        assert mode.runs == 1
        assert mode.median_ms > 0
        assert mode.modules > 0
        assert mode.import_by_package_ms
    # The handlers import more than the bare boto3 floor.
    assert result.modes["ingest"].modules > result.modes["floor"].modules
    assert result.function_kb["ingest"] > 0
    assert result.layer_mb is None  # nothing built


def test_dir_size_can_leave_out_bytecode(tmp_path):
    from bench.common import dir_size

    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_bytes(b"x" * 10)
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x" * 5)
    assert dir_size(tmp_path) == 15
    assert dir_size(tmp_path, bytecode=False) == 10
