"""The placement rule (docs/design.md §2) and the layouts built on it, as pure functions: no
processes."""

import copy
import itertools
import pickle

import pytest

from mpgroups.sharding.layout import ChannelShards, communicates, layer_shards
from mpgroups.sharding.placement import PlacementError, balanced_split, place, shard_slice


def test_balanced_split_follows_tensor_split():
    assert balanced_split(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert balanced_split(3, 2) == [(0, 2), (2, 3)]
    assert balanced_split(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize(
    "cin, cout, groups, world, expected_groups",
    [
        (6, 9, 3, 2, [2, 1]),  # uneven whole groups
        (64, 64, 32, 4, [8, 8, 8, 8]),
        (6, 6, 6, 4, [2, 2, 1, 1]),  # depthwise
    ],
)
def test_whole_groups(cin, cout, groups, world, expected_groups):
    placements = [place(cin, cout, groups, world, r) for r in range(world)]
    assert [p.local_groups for p in placements] == expected_groups
    assert not any(p.filter_split for p in placements)
    in_per_group, out_per_group = cin // groups, cout // groups
    for p in placements:
        g0, g1 = p.group_slice
        assert p.in_slice == (g0 * in_per_group, g1 * in_per_group)
        assert p.out_slice == (g0 * out_per_group, g1 * out_per_group)


def test_filter_split_uneven_team():
    # docs/design.md §2: G=1, C_out=6, P=4 -> filters 2, 2, 1, 1 of the one group.
    placements = [place(4, 6, 1, 4, r) for r in range(4)]
    assert [p.local_out_channels for p in placements] == [2, 2, 1, 1]
    assert all(p.filter_split and p.local_groups == 1 for p in placements)
    assert all(p.in_slice == (0, 4) and p.team == (0, 4) for p in placements)
    assert all(p.local_in_channels == 4 for p in placements)  # every filter reads all 4
    assert [p.team_rank for p in placements] == [0, 1, 2, 3]


def test_filter_split_teams_hold_their_group():
    placements = [place(4, 6, 2, 4, r) for r in range(4)]
    assert [p.team for p in placements] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert [p.in_slice for p in placements] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert [p.out_slice for p in placements] == [(0, 2), (2, 3), (3, 5), (5, 6)]


def test_refused_placement_names_groups_ranks_and_what_works():
    with pytest.raises(PlacementError, match=r"groups=3 cannot be placed on 4 ranks") as info:
        place(6, 9, 3, 4, 0)
    assert "world_size % groups == 0" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_refuses_teams_larger_than_filters():
    with pytest.raises(PlacementError, match="too few to split"):
        place(4, 2, 2, 4, 0)  # one filter per group, teams of two ranks


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
def test_every_placeable_case_tiles_the_channels(world):
    """Out slices tile [0, C_out) in rank order; sharded slices tile [0, C) likewise; every
    rank's out slice lies inside its in-slice's groups."""
    for groups, in_mult, out_mult in itertools.product([1, 2, 3, 4, 6, 8, 12], [1, 3], [1, 2]):
        cin, cout = groups * in_mult, groups * out_mult * 4
        try:
            placements = [place(cin, cout, groups, world, r) for r in range(world)]
        except PlacementError:
            assert groups < world and (world % groups or cout // groups < world // groups)
            continue
        outs = [p.out_slice for p in placements]
        assert outs[0][0] == 0 and outs[-1][1] == cout
        assert all(a[1] == b[0] for a, b in itertools.pairwise(outs))
        assert all(b > a for a, b in outs), "every rank owns an output channel"
        shards = [shard_slice(cout, groups, world, r) for r in range(world)]
        assert shards == outs, "the sharded layout is the out slice of a same-G layer"
        for p in placements:
            g0, g1 = p.in_slice[0] // in_mult, p.in_slice[1] // in_mult
            o0, o1 = p.out_slice
            assert g0 * (cout // groups) <= o0 and o1 <= g1 * (cout // groups)


def test_layer_shards_of_a_filter_split():
    shards = layer_shards(4, 6, 2, 4, 3)
    assert shards.inputs.slices == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert shards.outputs.slices == ((0, 2), (2, 3), (3, 5), (5, 6))
    assert shards.team_slices == ((0, 1), (1, 2))  # relative to group 1's first channel
    assert shards.team("team group").own == (1, 2)
    assert communicates(shards.placement, "sharded", "sharded")  # the team gathers its group


def test_layer_shards_of_whole_groups():
    shards = layer_shards(8, 8, 4, 2, 1)
    assert shards.team_slices is None
    assert not communicates(shards.placement, "sharded", "sharded")
    others = [("replicated", "replicated"), ("replicated", "sharded"), ("sharded", "replicated")]
    assert all(communicates(shards.placement, *layouts) for layouts in others)
    assert not communicates(layer_shards(8, 8, 4, 1, 0).placement, "replicated", "replicated")
    with pytest.raises(ValueError, match="holds whole groups"):
        shards.team(None)


def test_channel_shards_refuse_gaps_and_share_process_groups():
    with pytest.raises(ValueError, match="contiguous"):
        ChannelShards(None, ((0, 2), (3, 4)), 0)
    shards = ChannelShards("a process group", ((0, 2), (2, 3)), 1)
    assert copy.deepcopy(shards) is shards
    with pytest.raises(TypeError, match="full_state_dict"):
        pickle.dumps(shards)
    assert pickle.loads(pickle.dumps(ChannelShards(None, ((0, 2),), 0))).slices == ((0, 2),)
