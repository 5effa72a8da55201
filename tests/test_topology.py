"""The multi-process start line: world size (machines × processes), mesh shape, per-rank batch."""

from saecli.training.topology import machines, topology_line


def test_machines_from_the_launcher_environment():
    assert machines(8, {"LOCAL_WORLD_SIZE": "4"}) == (2, 4)  # 2 nodes × 4 GPUs
    assert machines(2, {}) == (1, 2)  # no launcher variable: one machine
    assert machines(2, {"LOCAL_WORLD_SIZE": "8"}) == (1, 2)  # never more per machine than in all


def test_topology_line():
    line = topology_line(8, 4096, 2, env={"LOCAL_WORLD_SIZE": "4"})
    assert (
        line
        == "world size 8 (2 machines × 4 processes) · mesh dp=8 · per rank 4,096 tokens × 2 accumulation steps per step"
    )
    assert "mesh dp=2 × tp=4" in topology_line(8, 512, mesh={"dp": 2, "tp": 4}, env={"LOCAL_WORLD_SIZE": "8"})
