"""The benchmarks: communication model, projection, report, published results, and a tiny run
end to end (no timing is asserted)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import projection
import pytest
import report
import torch
from cases import CASES, MAIN, QUICK, analytic_collectives, build_parallel, make_input
from comm_model import LINKS, Collective, Link, collective_seconds, layer_collectives
from loopback import loopback_group, loopback_world
from parity import case, expected_comm

import mpgroups
from mpgroups.sharding.placement import check_placeable

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


R, S = "replicated", "sharded"
# name: (conv or linear, in, out, groups, split, layouts, shard_groups): every row of the
# table in mpgroups/layers/layer_comm.py, split="rowwise" and shard_groups included.
LAYERS = {
    "column, replicated in (one team)": ("conv", 8, 12, 1, "colwise", (R, S), None),
    "column, replicated in and out": ("conv", 8, 12, 1, "colwise", (R, R), None),
    "column, sharded in": ("conv", 8, 12, 1, "colwise", (S, S), None),
    "column, shard_groups out": ("conv", 8, 16, 1, "colwise", (R, S), 4),
    "grouped, replicated in": ("conv", 8, 8, 4, "colwise", (R, R), None),
    "grouped, sharded": ("conv", 8, 8, 4, "colwise", (S, S), None),
    "two groups (teams at P=4)": ("conv", 8, 8, 2, "colwise", (R, S), None),
    "two groups, sharded (teams at P=4)": ("conv", 8, 8, 2, "colwise", (S, R), None),
    "row, all-reduce": ("conv", 8, 6, 1, "rowwise", (S, R), None),
    "row, reduce-scatter": ("conv", 8, 6, 1, "rowwise", (S, S), None),
    "row, shard_groups in": ("conv", 16, 6, 1, "rowwise", (S, R), 2),
    "row on whole groups (= split out)": ("conv", 8, 8, 4, "rowwise", (S, R), None),
    "linear column": ("linear", 12, 8, 1, "colwise", (R, S), None),
    "linear column, replicated out": ("linear", 12, 8, 1, "colwise", (R, R), None),
    "linear row, all-reduce": ("linear", 12, 8, 1, "rowwise", (S, R), None),
    "linear row, reduce-scatter": ("linear", 12, 8, 1, "rowwise", (S, S), None),
    "linear row, shard_groups in": ("linear", 24, 8, 1, "rowwise", (S, R), 2),
}


def _layer_records(spec: tuple, world: int, rank: int, input_grad: bool) -> dict[str, list]:
    """What one layer issues on ``rank`` of a ``world``-rank group that moves no data:
    ``{"forward": [(op, ranks, bytes)], "backward": [...]}`` (data collectives)."""
    kind, cin, cout, groups, split, (lin, lout), shard_groups = spec
    kwargs = dict(split=split, input_layout=lin, output_layout=lout, shard_groups=shard_groups)
    with loopback_world(world, rank) as process_group:
        if kind == "linear":
            layer = mpgroups.ParallelLinear(cin, cout, process_group=process_group, **kwargs)
        else:
            layer = mpgroups.GroupParallelConv2d(
                cin, cout, 3, padding=1, groups=groups, process_group=process_group, **kwargs
            )
        width = layer.shards.inputs.widths[rank] if lin == S else cin
        shape = (3, 2, width) if kind == "linear" else (3, width, 5, 5)
        x = torch.randn(shape, requires_grad=input_grad)
        records = {}
        with mpgroups.CommCounter() as forward:
            y = layer(x)
        with mpgroups.CommCounter() as backward:
            y.pow(2).sum().backward()
    for phase, comm in (("forward", forward), ("backward", backward)):
        data = [r for r in comm.records if r.kind == "data"]
        records[phase] = sorted((r.op, r.group_size, r.nbytes) for r in data)
    return records


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("world", [2, 4])
def test_comm_model_equals_what_each_layer_issues(name, world):
    """Row- and column-parallel convs and Linears, shard_groups, every layout: on every
    rank the analytic collectives of each phase are those CommCounter records, with and
    without an input grad (the rule for a replicated input of a groups=1 layer: one
    all-reduce of the input grad backward, only when the input requires grad)."""
    spec = LAYERS[name]
    kind, cin, cout, groups, split, layouts, shard_groups = spec
    rows = 6 if kind == "linear" else 3  # elements per channel: [3, 2, F] or [3, C, 5, 5]
    spatial = 1 if kind == "linear" else 25
    ops = set()
    for input_grad in (True, False):
        for rank in range(world):
            measured = _layer_records(spec, world, rank, input_grad)
            model = layer_collectives(
                cin, cout, groups, world, rank, layouts, rows, spatial, spatial, 4, input_grad,
                split=split, shard_groups=shard_groups,
            )  # fmt: skip
            for phase in ("forward", "backward"):
                want = sorted((c.op, c.group_size, c.nbytes) for c in model if c.phase == phase)
                assert measured[phase] == want, (name, world, rank, input_grad, phase)
            ops |= {c.op for c in model}
    if split == "rowwise" and layouts[1] == R and groups == 1:
        assert ops == {"all_reduce"}
    if name.startswith("column, replicated in (one team)"):
        assert ops == {"all_reduce"}  # the input grad, backward: nothing forward


def test_groups_one_replicated_input_sums_the_input_grad():
    """A groups=1 layer whose one team is the whole group takes a replicated input as it
    is: forward nothing, backward one all-reduce of the whole input grad (if it needs one)."""
    full = 2 * 8 * 81 * 4  # [N=2, C_in=8, 9x9] float32
    for world in (2, 4):
        for rank in range(world):
            got = layer_collectives(8, 12, 1, world, rank, (R, S), 2, 81, 81, 4)
            assert got == [Collective("all_reduce", world, full, "backward")]
            assert layer_collectives(8, 12, 1, world, rank, (R, S), 2, 81, 81, 4, False) == []


MODEL_CASES = [name for name, c in QUICK.items() if not c.convs]


@pytest.mark.parametrize("name", MODEL_CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_model_comm_model_equals_what_the_model_issues(name, world):
    """Whole models (AlexNet split as in 2012 and towers-only, the ResNeXt bottleneck under
    plan='auto' and the drop-in, batch-1 inference): every rank's measured data collectives
    per step, run as the benchmark runs it, equal the analytic list from the plan and
    ``layer_shards``."""
    from cases import labels, step_and_forward

    c = QUICK[name]
    for rank in range(world):
        for variant in c.gp_variants:
            with loopback_world(world, rank) as process_group:
                model = build_parallel(c, process_group, variant)
                x = make_input(c, c.batch, model)
                step = step_and_forward(model, x, labels(c), c.inference)[0]
                with mpgroups.CommCounter() as comm:
                    step()
            measured = sorted(
                (r.op, r.group_size, r.nbytes) for r in comm.records if r.kind == "data"
            )
            priced = analytic_collectives(c, world, rank, variant)
            assert measured == sorted((p.op, p.group_size, p.nbytes) for p in priced), (
                name, variant, rank,
            )  # fmt: skip
            assert measured, (name, variant)  # every one of them communicates at P > 1


def test_full_size_models_communicate_as_designed():
    """The published cases at P = 2: the 2012 AlexNet moves conv3's team gather, fc6's and
    fc8's all-reduce forward and fc7's input grad backward; the planned bottleneck one
    all-reduce each way of [N, 1024, 14, 14], the drop-in gathers [N, 512, 14, 14] twice."""
    n = 8
    block = analytic_collectives(CASES["resnext50_block"], 2, 0)
    whole = n * 1024 * 14 * 14 * 4
    assert [(c.op, c.nbytes, c.phase, c.layer) for c in block] == [
        ("all_reduce", whole, "backward", "conv1"),
        ("all_reduce", whole, "forward", "conv3"),
    ]
    dropin = analytic_collectives(CASES["resnext50_block"], 2, 1, "group_parallel_dropin")
    assert sorted((c.op, c.nbytes, c.phase) for c in dropin) == [
        ("all_gather", n * 512 * 196 * 4, "backward"),
        ("all_gather", n * 512 * 196 * 4, "forward"),
    ]
    assert [c.phase for c in analytic_collectives(CASES["resnext50_block_b1"], 4, 3)] == ["forward"]
    alexnet = analytic_collectives(CASES["alexnet_step"], 2, 0)
    n = 32
    assert [(c.op, c.nbytes, c.phase, c.layer) for c in alexnet] == [
        ("all_gather", 2 * 128 * n * 7 * 7 * 4, "forward", "features.conv3"),
        ("reduce_scatter", 2 * 128 * n * 7 * 7 * 4, "backward", "features.conv3"),
        ("all_reduce", n * 4096 * 4, "forward", "classifier.1"),
        ("all_reduce", n * 4096 * 4, "backward", "classifier.4"),
        ("all_reduce", n * 100 * 4, "forward", "classifier.6"),
    ]
    towers = analytic_collectives(CASES["alexnet_step"], 2, 0, "group_parallel_towers")
    assert [c.layer for c in towers] == ["features.conv3", "features.conv3", "features.pool5"]


def test_projection_speedup_and_efficiency():
    """``project``: one-process step / (rank 0's work at P + priced collectives and checks);
    efficiency = speedup / P. The collectives are those the run stored."""
    from projection import collectives_at, project

    link = LINKS["nvlink4"]
    stored = [Collective("all_reduce", 8, 10**6, "forward").__dict__]
    result = {
        "quick": False,
        "record_size": mpgroups.comm.checks.RECORD_SIZE,
        "runs": {
            "1": {
                "cases": {
                    "made_up": {
                        "local_compute_1thread": {"1": 0.8, "2": 0.45, "8": 0.11},
                        "local_meta_ops_per_step": {"2": 3, "8": 5},
                        "projected_collectives": {"2": [], "8": stored},
                    }
                }
            }
        },
    }
    assert collectives_at(result, "made_up", 8) == [Collective(**stored[0])]
    p = project(result, "made_up", 8, link)
    record = collective_seconds("all_gather", 8, 8 * mpgroups.comm.checks.RECORD_SIZE * 8, link)
    comm = collective_seconds("all_reduce", 8, 10**6, link) + 5 * record
    assert p["comm"] == pytest.approx(comm)
    assert p["speedup"] == pytest.approx(0.8 / (0.11 + comm))
    assert p["efficiency"] == pytest.approx(p["speedup"] / 8)
    assert project(result, "made_up", 4, link) is None  # P = 4 not timed
    del result["runs"]["1"]["cases"]["made_up"]["local_compute_1thread"]["1"]
    assert project(result, "made_up", 8, link) is None  # no one-process step (format 1)


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
    from harness import summary

    two = summary([0.010, 0.200])
    assert 0.010 <= two["p25"] <= two["median"] <= two["p75"] <= 0.200
    assert two["runs"] == 2
    assert summary([0.3]) == {"median": 0.3, "p25": 0.3, "p75": 0.3, "runs": 1}


@pytest.mark.parametrize("folder", ["results"])
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


def _step_records(model: torch.nn.Module, c, batch: int) -> list:
    """The collectives (op, ranks, bytes, kind) of one step of ``model`` as the benchmark
    runs it (``cases.step_and_forward``; an inference case: one no_grad forward)."""
    from cases import labels, step_and_forward

    batch_labels = labels(replace(c, batch=batch))
    step = step_and_forward(model, make_input(c, batch, model), batch_labels, c.inference)[0]
    with mpgroups.CommCounter() as comm:
        step()
    return [(r.op, r.group_size, r.nbytes, r.kind) for r in comm.records]


def _own_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: this rank's part}`` of every parameter: its rows of a split one (also of one
    held whole, whose other rows a group that moves no data never received), else its local
    tensor."""
    from mpgroups.layers.dtensor_state import local_tensor, own_rows
    from mpgroups.state.state_dict import sharded_keys

    split = sharded_keys(model)
    return {
        key: own_rows(p, *split[key]) if key in split else local_tensor(p)
        for key, p in model.named_parameters()
    }


def _loopback_model_does_the_ranks_work(ctx, suite: str) -> list[str]:
    loopback = loopback_group(ctx.process_group)
    checked = []
    for name, c in _SUITES[suite].items():
        batch = c.batch if c.inference else 2
        for variant in c.gp_variants:
            real = build_parallel(c, ctx.process_group, variant)
            local = build_parallel(c, loopback, variant)
            # The rank's own shards (state_dict would gather the full tensors over the group).
            real_params, local_params = _own_shards(real), _own_shards(local)
            assert list(local_params) == list(real_params), name
            for key, value in real_params.items():
                assert torch.equal(local_params[key], value), (name, key)
            # The same collectives (whose time the benchmark takes off); the input grad as
            # in the benchmark: a block's (as inside a network), not AlexNet's.
            records = _step_records(local, c, batch)
            assert records == _step_records(real, c, batch), (name, variant)
            data = sorted(record[:3] for record in records if record[3] == "data")
            priced = analytic_collectives(
                replace(c, batch=batch), ctx.world_size, ctx.rank, variant
            )
            assert data == sorted((p.op, p.group_size, p.nbytes) for p in priced), name
        checked.append(name)
    return checked


# The quick cases, and the full cases that have no tiny twin among them (single layers whose
# channels and groups are the published ones: the layouts teams form from). A full case with a
# twin runs the same plan and collectives on larger tensors (seconds of compute more).
_SUITES = {
    "quick": QUICK,
    "full-untwinned": {name: c for name, c in CASES.items() if name not in QUICK},
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "suite, world_size",
    # At P = 4 teams form and every case splits furthest; the quick cases at P = 2 too.
    [("quick", 2), ("quick", 4), ("full-untwinned", 4)],
)
def test_loopback_model_does_the_ranks_work(pool, world_size, suite):
    """The projection's compute is the rank's own model, collectives and all, minus the wire."""
    checked = pool.run(_loopback_model_does_the_ranks_work, world_size, suite, timeout=200)
    assert checked == [list(_SUITES[suite])] * world_size


def test_dtensor_params_benchmark_compares_the_same_model(tmp_path):
    """The with/without DTensor parameters comparison runs on every case, and its two
    variants compute the same output (the benchmark raises otherwise)."""
    import dtensor_params

    assert dtensor_params.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dtensor_params.json").read_text())
    assert set(data["summary"]) == {
        "alexnet_step",
        "resnext50_block",
        "alexnet_b1",
        "resnext50_block_b1",
    }
    for row in data["summary"].values():
        assert row["dtensor"]["runs"] == row["plain"]["runs"] == 2 and row["ratio"] > 0
    assert "| DTensor / plain |" in (tmp_path / "dtensor_params.md").read_text()


def test_benchmark_runs_and_writes_json_table_and_plots(tmp_path, capsys):
    """Its main() in this process (the rank processes it starts are its own)."""
    import scaling

    assert scaling.main(["--quick", "--world-sizes", "1", "2", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    stored = (tmp_path / "scaling.json").read_bytes()
    data = json.loads(stored)
    assert set(data["runs"]) == {"1", "2"}
    assert data["commit"] is None or len(data["commit"]["sha"]) == 40
    assert data["format"] == 2
    priced, ops = 0, set()
    for world, run in data["runs"].items():
        assert set(run["cases"]) == set(QUICK)
        for name, c in run["cases"].items():
            comms = {MAIN: c["comm"], **c.get("variant_comm", {})}
            assert set(comms) == set(QUICK[name].gp_variants), (world, name)
            for variant, comm in comms.items():
                assert comm["measured_bytes"] == comm["analytic_bytes"], (world, name, variant)
                times = c["times"][variant]["step"]
                assert times["runs"] == 2 and 0 < times["p25"] <= times["median"] <= times["p75"]
                assert 0 <= comm["share_of_step"] <= 1 and set(comm["share_by_op"]) <= {
                    "all_gather", "reduce_scatter", "all_reduce",
                }  # fmt: skip
            if QUICK[name].inference:
                assert "ddp" not in c["times"] and "param_and_optimizer_bytes" not in c
                assert c["times"][MAIN]["forward"] == c["times"][MAIN]["step"]
            else:
                assert set(c["param_and_optimizer_bytes"]) >= set(comms) | {"single"}
            if world == "1":
                assert set(c["local_compute_1thread"]) == {"1", "2", "4", "8"}
                assert set(c["projected_collectives"]) == {"2", "4", "8"}
            if world == "2":
                assert {"single_t", "single_T", "local"} <= set(c["times"])
                assert ("ddp" in c["times"]) == (not QUICK[name].inference)
                # The link is timed at the very messages the projection prices.
                for comm in comms.values():
                    for coll in comm["collectives"]:
                        timed = dict(run["link"][f"{coll['op']}/{coll['group_size']}"])
                        assert timed[coll["nbytes"]] > 0, (name, coll)
                        priced += 1
                        ops.add(coll["op"])
    assert priced > 0 and ops == {"all_gather", "reduce_scatter", "all_reduce"}
    table = (tmp_path / "table.md").read_text()
    assert table in stdout
    assert "| alexnet_towers | 2 |" in table and "Projection" in table
    for row in ("| alexnet_step [towers] | 2 |", "| resnext50_block [dropin] | 2 |",
                "| alexnet_b1 | 2 |", "| resnext50_block_b1 | 2 |"):  # fmt: skip
        assert row in table, row
    assert "DDP cannot split a batch of 1" in table
    assert "| all_reduce |" in table  # the share of the step per op
    assert "Projection to NVLink 4" in table and "| efficiency |" in table
    assert "Targets of issue 14" in table
    assert "| AlexNet step efficiency, projected to NVLink 4, P=8 |" in table
    assert ("Commit: " in table) == (data["commit"] is not None)
    for png in ("scaling.png", "comm_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The projection and the report of a stored run, in this process (their CLIs' main).
    capsys.readouterr()
    assert projection.main(["--results", str(tmp_path / "scaling.json"), "--link", "nvlink4"]) == 0
    projected = capsys.readouterr().out
    assert "alexnet_towers" in projected and "NVLink" in projected
    assert "efficiency" in projected and "resnext50_block_b1" in projected
    again = tmp_path / "again"
    assert report.main([str(tmp_path / "scaling.json"), "--out", str(again)]) == 0
    rendered = capsys.readouterr().out
    assert rendered == table + "\n"
    assert (again / "table.md").read_text() == table
    assert "Fitted gloo links at P=2" in rendered and "| error at size |" in rendered
    for png in ("scaling.png", "comm_share.png"):
        assert (again / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "scaling.json").read_bytes() == stored  # only read
    assert not (again / "scaling.json").exists()


def test_published_profile_renders_to_its_table(tmp_path):
    """``results/profile/profile.md`` is what ``profile_step.py --from-json`` makes of its
    JSON today (the profile RESULTS.md quotes)."""
    import profile_step

    stored = ROOT / "benchmarks" / "results" / "profile"
    assert (
        profile_step.main(["--from-json", str(stored / "profile.json"), "--out", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "profile.md").read_text() == (stored / "profile.md").read_text()


def test_saved_bytes_counts_each_storage_once():
    """A Linear saves its input and its weight, the ReLU its output, the loss that output
    again (the same storage): 2 x 8 floats twice, and the 8 x 8 weight apart."""
    from activation_memory import saved_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    assert saved_bytes(model, torch.randn(2, 8), None) == {"activations": 128, "parameters": 256}


def test_activation_memory_per_rank_is_below_one_device(tmp_path):
    """Every rank of every case saves less than one device, and less at P = 4 than at 2."""
    import activation_memory

    assert activation_memory.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "activation_memory.json").read_text())
    for name, row in data["cases"].items():
        single = row["single"]["activations"]
        largest = {p: max(r["activations"] for r in ranks) for p, ranks in row["ranks"].items()}
        assert largest["4"] < largest["2"] < single, (name, largest, single)
    assert "| per rank / one device |" in (tmp_path / "activation_memory.md").read_text()


def test_whole_model_benchmark_compares_both_objectives(tmp_path):
    """torchvision's ResNeXt (one block per stage, tiny batch) beside one process under both
    ``auto_plan`` objectives: each parallel model checked against the plain one (the benchmark
    raises otherwise), the memory objective holding half the parameters and activations."""
    import whole_model

    assert whole_model.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "whole_model.json").read_text())
    assert set(data["summary"]) == {"one process", "collectives", "memory"}
    facts = data["facts"]
    assert facts["memory"]["params_share"] <= 0.501 < facts["collectives"]["params_share"]
    assert facts["memory"]["activations_share"] < facts["collectives"]["activations_share"] < 1
    # Four blocks: an all-reduce each forward and backward; under the memory objective a
    # reduce-scatter forward and an all-gather backward per dense conv (three a block), and the
    # classifier's all-reduce.
    assert facts["collectives"]["ops"] == {"all_reduce": 8}
    assert facts["memory"]["ops"] == {"reduce_scatter": 12, "all_gather": 12, "all_reduce": 1}
    assert '| `objective="memory"` |' in (tmp_path / "whole_model.md").read_text()


def test_spatial_benchmark_reports_memory_and_the_budget(tmp_path):
    """The 2-D U-Net at two tiny sizes, one process and P = 2 (rows): the table, the plot,
    activation bytes per rank below one device's, parameters whole on every rank, and a
    budget that grows with P."""
    import spatial

    assert spatial.main(["--quick", "--cases", "unet2d", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "spatial.json").read_text())
    rows = data["cases"]["unet2d"]["rows"]
    assert {(row["world"], tuple(row["size"]), row["layout"]) for row in rows.values()} == {
        (world, size, "rows" if world > 1 else "one")
        for world in (1, 2)
        for size in ((16, 8), (32, 8))
    }
    for size in ("16x8", "32x8"):
        split, one = rows[f"{size}/P=2/rows"], rows[f"{size}/P=1/one"]
        assert split["activations"] < 0.6 * one["activations"]
        assert split["parameters"] == one["parameters"]  # whole on every rank
        assert sum(split["ops"]["halo_exchange"]) > 0
    budget = data["cases"]["unet2d"]["budget"]
    assert budget["2/rows"] > 1.5 * budget["1/one"]
    assert (tmp_path / "spatial.png").stat().st_size > 0
    assert "| unet2d | 32x8 | 2 | rows |" in (tmp_path / "spatial.md").read_text()
