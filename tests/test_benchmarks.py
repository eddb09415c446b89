"""The benchmarks: communication model, projection, report, published results, and a tiny run
end to end (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cases import CASES, QUICK, analytic_collectives, build_parallel, make_input
from comm_model import LINKS, Link, collective_seconds, layer_collectives
from loopback import loopback_group
from parity import case, expected_comm

import mpgroups
from mpgroups.placement import check_placeable

ROOT = Path(__file__).resolve().parent.parent

COMM_CASES = {
    "g4": case(),
    "uneven": case(cin=6, cout=9, groups=3),
    "filter-split": case(cin=4, cout=6, groups=1),
    "g2": case(cin=4, cout=6, groups=2),
}
REFUSED = {("uneven", 4)}  # 3 groups on 4 ranks: no equal teams, one per group
LAYOUTS = [("replicated", "replicated"), ("sharded", "sharded"), ("replicated", "sharded")]


def _layer_collectives(c: dict, world: int, rank: int, layout: tuple[str, str]):
    return layer_collectives(
        c["cin"], c["cout"], c["groups"], world, rank, layout, c["batch"], 81, 81, 4
    )


@pytest.mark.parametrize("name", list(COMM_CASES))
@pytest.mark.parametrize("world", [2, 4])
def test_comm_model_agrees_with_the_tests_derivation(name, world):
    """Every rank and layout pair: the collectives the benchmarks price are those the tests
    derive (``parity.expected_comm``); a case the placement rule refuses, both refuse."""
    c = COMM_CASES[name]
    if (name, world) in REFUSED:
        with pytest.raises(mpgroups.PlacementError):
            check_placeable(c["groups"], world)
        for layout in LAYOUTS:
            for rank in range(world):
                with pytest.raises(mpgroups.PlacementError):
                    _layer_collectives(c, world, rank, layout)
                with pytest.raises(mpgroups.PlacementError):
                    expected_comm(c, world, rank, layout, (9, 9), (9, 9))
        return
    check_placeable(c["groups"], world)
    compared, with_traffic = 0, 0
    for layout in LAYOUTS:
        for rank in range(world):
            expected = expected_comm(c, world, rank, layout, (9, 9), (9, 9))
            model = _layer_collectives(c, world, rank, layout)
            assert sorted((m.op, m.nbytes) for m in model) == sorted(expected.elements())
            compared += 1
            with_traffic += bool(model)
    assert compared == len(LAYOUTS) * world
    assert with_traffic > 0  # a replicated output is gathered at every P > 1


def test_alpha_beta_model():
    link = LINKS["pcie5"]
    one_gb = collective_seconds("all_gather", 4, 10**9, link)
    assert one_gb == pytest.approx(3 * link.latency_s + 0.75e9 / link.busbw_bytes_per_s)
    reduce = collective_seconds("all_reduce", 4, 10**9, link)
    assert reduce == pytest.approx(6 * link.latency_s + 1.5e9 / link.busbw_bytes_per_s)
    assert collective_seconds("all_gather", 1, 10**9, link) == 0.0


@pytest.mark.parametrize(("op", "group_size"), [("all_gather", 4), ("reduce_scatter", 2)])
def test_link_fit_recovers_alpha_and_bandwidth(op, group_size):
    from projection import fit_link

    true = Link("synthetic", 300e-6, 0.5e9)
    sizes = (4_096, 65_536, 2_097_152, 33_554_432)
    points = [(n, collective_seconds(op, group_size, n, true)) for n in sizes]
    fitted = fit_link(points, op, group_size)
    assert fitted.latency_s == pytest.approx(true.latency_s, rel=1e-6)
    assert fitted.busbw_bytes_per_s == pytest.approx(true.busbw_bytes_per_s, rel=1e-6)


def test_short_steps_are_timed_in_more_repetitions():
    from argparse import Namespace

    from scaling import MAX_REPS_FACTOR, _timed_reps

    args = Namespace(reps=7, min_time=4.0)
    assert _timed_reps(2.0, args) == 7  # a long step: the minimum
    assert _timed_reps(0.25, args) == 16  # 4 s of the slowest variant
    assert _timed_reps(0.001, args) == MAX_REPS_FACTOR * 7  # capped
    assert _timed_reps(0.25, Namespace(reps=2, min_time=0.0)) == 2  # --quick


def test_quartiles_stay_within_the_times_measured():
    """Two repetitions (``--quick``): p25 and p75 lie between them, never beyond."""
    from scaling import _summary

    summary = _summary([0.010, 0.200])
    assert 0.010 <= summary["p25"] <= summary["median"] <= summary["p75"] <= 0.200
    assert summary["runs"] == 2
    assert _summary([0.3]) == {"median": 0.3, "p25": 0.3, "p75": 0.3, "runs": 1}


@pytest.mark.parametrize("folder", ["results", "results/repeat"])
def test_published_results_render_to_their_table(folder, tmp_path):
    """The published runs' tables are what report.py makes of their JSON today."""
    from projection import validate
    from report import write_table

    stored = ROOT / "benchmarks" / folder
    result = json.loads((stored / "scaling.json").read_text())
    assert validate(result) == json.loads(json.dumps(result["projection"]))
    result["projection"] = validate(result)
    assert write_table(result, tmp_path / "table.md") == (stored / "table.md").read_text()


def test_runs_write_to_an_ignored_folder_by_default():
    import report
    import scaling

    assert scaling.DEFAULT_OUT == report.DEFAULT_OUT == ROOT / "benchmarks" / "out"
    assert "benchmarks/out/" in (ROOT / ".gitignore").read_text().splitlines()


def test_link_fit_never_prices_bytes_below_zero():
    """Noise that makes the larger message faster gives no bandwidth, not a negative one."""
    from projection import fit_link

    fitted = fit_link([(192, 4.6e-3), (1_605_632, 3.5e-3)], "reduce_scatter", 2)
    assert fitted.busbw_bytes_per_s == float("inf")
    assert fitted.latency_s == pytest.approx(4.6e-3)
    assert collective_seconds("reduce_scatter", 2, 10**9, fitted) == pytest.approx(4.6e-3)


def test_measured_times_interpolate_between_sizes():
    from projection import MeasuredTimes

    times = MeasuredTimes(((1_000, 1e-3), (3_000, 2e-3), (5_000, 6e-3)))
    assert times.seconds(3_000) == pytest.approx(2e-3)
    assert times.seconds(2_000) == pytest.approx(1.5e-3)
    assert times.seconds(4_000) == pytest.approx(4e-3)
    assert times.seconds(7_000) == pytest.approx(10e-3)  # the last segment's line
    assert times.seconds(0) == pytest.approx(0.5e-3)  # the first segment's line
    assert MeasuredTimes(((1_000, 1e-3), (2_000, 5e-3))).seconds(0) == 0.0  # floored at zero


def _step_records(
    model: torch.nn.Module, x: torch.Tensor, input_grad: bool
) -> tuple[list, torch.Size]:
    """The collectives of one forward + backward (op, ranks, bytes, kind), and the output shape."""
    with mpgroups.CommCounter() as comm:
        out = model(x.requires_grad_(input_grad))
        out.float().pow(2).mean().backward()
    return [(r.op, r.group_size, r.nbytes, r.kind) for r in comm.records], out.shape


def _loopback_model_does_the_ranks_work(ctx, suite: str) -> list[str]:
    loopback = loopback_group(ctx.process_group)
    checked = []
    for name, c in (QUICK if suite == "quick" else CASES).items():
        real = build_parallel(c, ctx.process_group)
        local = build_parallel(c, loopback)
        # The rank's own shards (state_dict would gather the full tensors over the group).
        real_params, local_params = dict(real.named_parameters()), dict(local.named_parameters())
        assert list(local_params) == list(real_params), name
        for key, value in real_params.items():
            assert torch.equal(local_params[key], value), (name, key)
        # The same collectives (whose time the benchmark takes off), the same output shape;
        # the input grad as in the benchmark: a block's (as inside a network), not AlexNet's.
        input_grad = c.alexnet is None
        records, shape = _step_records(local, make_input(c, 2, local), input_grad)
        assert (records, shape) == _step_records(real, make_input(c, 2, real), input_grad), name
        data = sorted(record[:3] for record in records if record[3] == "data")
        priced = analytic_collectives(replace(c, batch=2), ctx.world_size, ctx.rank)
        assert data == sorted((p.op, p.group_size, p.nbytes) for p in priced), name
        checked.append(name)
    return checked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("suite", ["quick", "full"])
def test_loopback_model_does_the_ranks_work(pool, world_size, suite):
    """The projection's compute is the rank's own model, collectives and all, minus the wire."""
    checked = pool.run(_loopback_model_does_the_ranks_work, world_size, suite, timeout=200)
    expected = list(QUICK if suite == "quick" else CASES)
    assert checked == [expected] * world_size


def test_benchmark_runs_and_writes_json_table_and_plots(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick",
        "--world-sizes", "1", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    stored = (tmp_path / "scaling.json").read_bytes()
    data = json.loads(stored)
    assert set(data["runs"]) == {"1", "2"}
    assert data["commit"] is None or len(data["commit"]["sha"]) == 40
    priced = 0
    for world, run in data["runs"].items():
        assert set(run["cases"]) == {"alexnet_towers", "resnext50_stage3", "alexnet_step"}
        for name, c in run["cases"].items():
            assert c["comm"]["measured_bytes"] == c["comm"]["analytic_bytes"], (world, name)
            times = c["times"]["group_parallel"]["step"]
            assert times["runs"] == 2 and 0 < times["p25"] <= times["median"] <= times["p75"]
            if world == "2":
                assert {"ddp", "single_t", "single_T", "local"} <= set(c["times"])
                # The link is timed at the very messages the projection prices.
                for coll in c["comm"]["collectives"]:
                    timed = dict(run["link"][f"{coll['op']}/{coll['group_size']}"])
                    assert timed[coll["nbytes"]] > 0, (name, coll)
                    priced += 1
    assert priced > 0
    table = (tmp_path / "table.md").read_text()
    assert "| alexnet_towers | 2 |" in table and "Projection" in table
    assert ("Commit: " in table) == (data["commit"] is not None)
    for png in ("scaling.png", "comm_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    projected = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "projection.py"), "--results",
         str(tmp_path / "scaling.json"), "--link", "nvlink4"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert projected.returncode == 0, projected.stderr
    assert "alexnet_towers" in projected.stdout and "NVLink" in projected.stdout
    again = tmp_path / "again"
    rendered = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(tmp_path / "scaling.json"),
         "--out", str(again)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == table + "\n"
    assert (again / "table.md").read_text() == table
    assert "Fitted gloo links at P=2" in rendered.stdout and "| error at size |" in rendered.stdout
    for png in ("scaling.png", "comm_share.png"):
        assert (again / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "scaling.json").read_bytes() == stored  # only read
    assert not (again / "scaling.json").exists()
