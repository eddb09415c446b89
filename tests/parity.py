"""Tasks that compare a group-parallel layer with ``torch.nn`` on the full tensors.

Each function runs inside a pool worker (see ``dist_harness``); every rank builds the same
reference module and data from the same seed and checks what it holds.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn
from torch.distributed.tensor import Shard

import mpgroups
from mpgroups.sharding.placement import place, shard_slice
from mpgroups.state.state_dict import sharded_keys

LAYOUT_PAIRS = [
    ("replicated", "replicated"),
    ("replicated", "sharded"),
    ("sharded", "sharded"),
    ("sharded", "replicated"),
]
PARALLEL = {
    1: mpgroups.GroupParallelConv1d,
    2: mpgroups.GroupParallelConv2d,
    3: mpgroups.GroupParallelConv3d,
}
REFERENCE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def case(**overrides) -> dict:
    """A conv case: defaults overridden by keyword (``spatial`` excludes batch and channels)."""
    c = dict(
        dims=2,
        cin=8,
        cout=8,
        groups=4,
        kernel=3,
        stride=1,
        padding=1,
        dilation=1,
        padding_mode="zeros",
        bias=True,
        batch=3,
        spatial=(9, 9),
        memory="contiguous",
        dtype=torch.float32,
    )
    c.update(overrides)
    return c


def case_id(c: dict) -> str:
    default = case()
    parts = [f"{k}={v}" for k, v in c.items() if k not in default or default[k] != v]
    return ",".join(parts).replace("torch.", "") or "default"


def assert_close(actual, expected, tol: float, what: str) -> float:
    """Max abs error relative to ``max(1, |expected|_max)``, asserted below ``tol``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    if not err <= tol * scale:  # also catches NaN
        raise AssertionError(f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}")
    return err / scale


def held_whole(model: nn.Module, buffers: bool = False) -> list[str]:
    """The parameters (``buffers``: the buffers) of a parallelized model split over its ranks
    unlike ``torch.chunk``, so held whole on every rank (a DTensor ``Replicate()``): each
    parameter gathers its rows' grads backward, each buffer its rows after a training
    forward (one all-gather each)."""
    held = dict(model.named_buffers() if buffers else model.named_parameters())
    return [
        key
        for key, (shards, _) in sharded_keys(model).items()
        if shards.world_size > 1
        and key in held
        and getattr(held[key], "placements", [Shard(0)])[0].is_replicate()
    ]


def make_reference(c: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = REFERENCE[c["dims"]](
        c["cin"],
        c["cout"],
        c["kernel"],
        c["stride"],
        c["padding"],
        c["dilation"],
        c["groups"],
        c["bias"],
        c["padding_mode"],
        dtype=c["dtype"],
    )
    x = torch.randn(c["batch"], c["cin"], *c["spatial"], dtype=c["dtype"])
    return ref, x


def with_memory(t: torch.Tensor, memory: str) -> torch.Tensor:
    if memory == "channels_last":
        # Channels innermost in memory, even for one channel (where .contiguous(memory_format=)
        # keeps the strides it finds, since both layouts then hold the same bytes).
        order = (0, *range(2, t.dim()), 1)
        return torch.empty_permuted(t.shape, order, dtype=t.dtype).copy_(t)
    if memory == "noncontiguous":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
        assert not out.is_contiguous()
        return out
    return t


def memory_format(t: torch.Tensor) -> str:
    """``"channels_last"``, ``"contiguous"`` or ``"strided"``: how ``t`` is laid out.

    With one channel both layouts are contiguous; the channel stride tells them apart.
    """
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if last is not None and t.is_contiguous(memory_format=last):
        one_channel_last = t.stride(1) == 1 and t.shape[2:].numel() > 1
        if not t.is_contiguous() or one_channel_last:
            return "channels_last"
    return "contiguous" if t.is_contiguous() else "strided"


def expected_comm(c: dict, world: int, rank: int, layouts, in_spatial, out_spatial) -> Counter:
    """The (op, bytes) records docs/design.md §3 prescribes for one forward + backward, from the
    placement rule alone. Uneven shards count padded to the widest."""
    cin, cout, groups, n = c["cin"], c["cout"], c["groups"], c["batch"]
    elt = torch.empty(0, dtype=c["dtype"]).element_size()
    s_in, s_out = math.prod(in_spatial), math.prod(out_spatial)
    pl = place(cin, cout, groups, world, rank)
    in_widths = [b - a for a, b in (shard_slice(cin, groups, world, r) for r in range(world))]
    out_widths = [
        b - a for a, b in (place(cin, cout, groups, world, r).out_slice for r in range(world))
    ]
    team_widths = in_widths[pl.team[0] : pl.team[1]]
    team = pl.team_size
    expected = Counter()
    in_layout, out_layout = layouts
    if pl.filter_split:
        team_bytes = team * n * max(team_widths) * s_in * elt
        if in_layout == "replicated" and team == world:
            # One team reads every channel: the input grads are summed (all-reduce).
            expected[("all_reduce", n * cin * s_in * elt)] += 1
        elif in_layout == "replicated":
            expected[("reduce_scatter", team_bytes)] += 1
            expected[("all_gather", world * n * max(in_widths) * s_in * elt)] += 1
        else:
            expected[("all_gather", team_bytes)] += 1
            expected[("reduce_scatter", team_bytes)] += 1
    elif in_layout == "replicated":
        expected[("all_gather", world * n * max(in_widths) * s_in * elt)] += 1
    if out_layout == "replicated":
        expected[("all_gather", world * n * max(out_widths) * s_out * elt)] += 1
    return expected


def check_layer(ctx, c: dict, layout_pairs=LAYOUT_PAIRS) -> dict:
    """Every layout pair of one case against ``nn.ConvNd``: forward, input, weight, bias grads
    and the collectives issued. Returns the worst relative errors."""
    ref, x = make_reference(c)
    tol = TOLERANCE[c["dtype"]]
    x_ref = with_memory(x, c["memory"]).detach().requires_grad_()
    y_ref = ref(x_ref)
    torch.manual_seed(1)
    grad_y = torch.randn_like(y_ref)
    y_ref.backward(grad_y)
    worst = Counter()
    for layouts in LAYOUT_PAIRS if layout_pairs is None else layout_pairs:
        layer = PARALLEL[c["dims"]].from_conv(
            ref, ctx.process_group, input_layout=layouts[0], output_layout=layouts[1]
        )
        what = f"rank {ctx.rank}/{ctx.world_size} {layouts[0]}->{layouts[1]}"
        in_keep = slice(*layer.input_shard) if layouts[0] == "sharded" else slice(None)
        out_keep = slice(*layer.output_shard) if layouts[1] == "sharded" else slice(None)
        x_in = with_memory(x[:, in_keep].clone(), c["memory"]).detach().requires_grad_()
        with mpgroups.CommCounter() as comm:
            y = layer(x_in)
            y.backward(grad_y[:, out_keep])
        o0, o1 = layer.out_slice
        for name, got, want in (("output", y, y_ref), ("input grad", x_in.grad, x_ref.grad)):
            if memory_format(got) != memory_format(want):
                raise AssertionError(
                    f"{what} {name}: memory format {memory_format(got)}, "
                    f"nn.Conv{c['dims']}d gives {memory_format(want)}"
                )
        errors = {
            "output": assert_close(y, y_ref[:, out_keep], tol, f"{what} output"),
            "input grad": assert_close(
                x_in.grad, x_ref.grad[:, in_keep], tol, f"{what} input grad"
            ),
            "weight grad": assert_close(
                layer.weight.grad, ref.weight.grad[o0:o1], tol, f"{what} weight grad"
            ),
        }
        if c["bias"]:
            errors["bias grad"] = assert_close(
                layer.bias.grad, ref.bias.grad[o0:o1], tol, f"{what} bias grad"
            )
        else:
            assert layer.bias is None
        got = Counter((r.op, r.nbytes) for r in comm.records if r.kind == "data")
        want = expected_comm(c, ctx.world_size, ctx.rank, layouts, x.shape[2:], y_ref.shape[2:])
        if got != want:
            raise AssertionError(
                f"{what}: collectives {dict(got)}, docs/design.md §3 says {dict(want)}"
            )
        for k, v in errors.items():
            worst[k] = max(worst[k], v)
    return dict(worst)
