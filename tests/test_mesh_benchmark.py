"""The 2-D mesh benchmark (``benchmarks/mesh.py``) runs end to end in ``--quick`` mode and writes
the three variants, the baseline and the projection rows (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import mesh
import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"ddp", "gp", "mesh"}


@pytest.mark.timeout(420)
def test_mesh_benchmark_quick_writes_variants_and_projection(tmp_path, capsys):
    """Its main() in this process (the rank processes it starts are its own)."""
    assert mesh.main(["--quick", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    stored = (tmp_path / "mesh.json").read_bytes()
    data = json.loads(stored)
    assert data["quick"] and data["format"] == 1
    assert len(data["load_average"]["start"]) == 3

    measured = data["measured"]
    assert measured["ranks"] == 4 and measured["threads_per_rank"] == 1
    assert measured["oversubscribed"] == (measured["cores"] < 4)
    variants = measured["variants"]
    assert set(variants) == VARIANTS | {"single"}
    layouts = {name: tuple(v["layout"]) for name, v in variants.items()}
    assert layouts == {"single": (1, 1), "ddp": (4, 1), "gp": (1, 4), "mesh": (2, 2)}
    batch = data["case"]["batch"]
    for name, v in variants.items():
        times = v["times"]
        assert times["runs"] == 2 and 0 < times["p25"] <= times["median"] <= times["p75"], name
        assert v["batch_per_rank"] == batch // v["layout"][0]
        assert v["param_and_momentum_bytes"] > 0
    for name in ("gp", "mesh"):
        comm = variants[name]["gp_comm"]
        assert comm["measured_bytes"] == comm["analytic_bytes"] > 0, name
        assert comm["equal_on_every_rank"], name
    assert variants["gp"]["ddp_allreduce_bytes"] == 0
    # DDP all-reduces the rank's parameters: all of them, or the mesh's gp shard of them.
    full = variants["ddp"]["ddp_allreduce_bytes"]
    assert full * 2 == variants["ddp"]["param_and_momentum_bytes"]
    assert 0 < variants["mesh"]["ddp_allreduce_bytes"] < full

    projection = data["projection"]
    assert projection["world"] == 16
    rows = projection["rows"]
    scenarios = set(data["topology"]["scenarios"])
    assert {r["scenario"] for r in rows} == scenarios and projection[
        "default_scenario"
    ] in scenarios
    for scenario in scenarios:
        found = {r["variant"]: tuple(r["layout"]) for r in rows if r["scenario"] == scenario}
        assert found == {"ddp": (16, 1), "gp": (1, 16), "mesh": (2, 8)}, scenario
    for r in rows:
        assert r["step"] == pytest.approx(r["compute"] + r["comm"]) and r["compute"] > 0
        assert r["comm"] == pytest.approx(r["comm_inside_node"] + r["comm_between_nodes"])
        assert r["efficiency"] == pytest.approx(r["one_process"] / r["step"] / 16)
    default = {r["variant"]: r for r in rows if r["scenario"] == projection["default_scenario"]}
    # DDP over 16 crosses the nodes with every byte; the mesh's GP stays inside a node and only
    # its DDP crosses; GP over 16 moves some of its collectives across.
    assert default["ddp"]["bytes_inside_node"] == 0 and default["ddp"]["bytes_between_nodes"] > 0
    assert default["mesh"]["bytes_inside_node"] > 0 and default["mesh"]["bytes_between_nodes"] > 0
    assert default["gp"]["bytes_between_nodes"] > 0
    # The local work's collectives equal the analytic ones the projection prices.
    for local in data["local"].values():
        assert local["measured_data_bytes"] == sum(c["nbytes"] for c in local["collectives"])

    table = (tmp_path / "table.md").read_text()
    assert "4 ranks on" in table and "## Projected: 2 nodes × 8 GPUs (P = 16)" in table
    labels = (
        "DDP over 4", "GP over 4", "mesh: GP over 2 × FSDP2 over 2", "DDP over 16",
        "GP over 16 (across nodes)", "mesh: GP over 8 (a node) × FSDP2 over 2 (nodes)",
    )  # fmt: skip
    for label in labels:
        assert f"| {label} |" in table, label
    assert table in stdout

    # A stored run renders to the same table, without being written over.
    again = tmp_path / "again"
    assert mesh.main(["--from-json", str(tmp_path / "mesh.json"), "--out", str(again)]) == 0
    assert (again / "table.md").read_text() == table
    assert (tmp_path / "mesh.json").read_bytes() == stored
    assert not (again / "mesh.json").exists()


def test_published_mesh_run_renders_to_its_table(tmp_path):
    """``benchmarks/results/mesh/table.md`` is what ``--from-json`` makes of its JSON today
    (rendered in this process: a subprocess would prove nothing more)."""
    stored = ROOT / "benchmarks" / "results" / "mesh"
    assert mesh.main(["--from-json", str(stored / "mesh.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() == (stored / "table.md").read_text()
    assert not json.loads((stored / "mesh.json").read_text())["quick"]
