"""Acceptance 1 and 4 of the foundation: every layout pair equals nn.ConvNd at P = 2 and 4,
and moves exactly the collectives docs/design.md §3 prescribes."""

import pytest
import torch
from parity import case, case_id, check_layer

import mpgroups
from mpgroups.sharding.placement import check_placeable

CASES = [
    # Placements: whole groups (even, uneven), filter split (even, uneven), depthwise.
    case(cin=4, cout=6, groups=1),  # P=2: 3+3 filters; P=4: 2,2,1,1
    case(cin=4, cout=6, groups=2),  # P=2: one group each; P=4: teams of 2, filters 2+1
    case(cin=4, cout=8, groups=2),  # P=4: teams of 2, filters 2+2
    case(cin=6, cout=9, groups=3),  # P=2: groups 2+1; P=4: refused
    case(cin=8, cout=8, groups=4),
    case(cin=16, cout=24, groups=8),
    case(cin=64, cout=64, groups=32, spatial=(6, 6)),
    case(cin=6, cout=6, groups=6),  # depthwise; P=4: groups 2,2,1,1
    case(cin=6, cout=12, groups=6),  # depthwise with multiplier 2
    case(cin=3, cout=8, groups=1, kernel=5, padding=2),  # 3 input channels over 4 ranks
    # Geometry and options.
    case(stride=2, padding=1),
    case(padding="same"),
    case(padding="same", kernel=4, dilation=2),
    case(padding="valid", kernel=2),
    case(dilation=2, padding=2),
    case(padding_mode="reflect"),
    case(padding_mode="circular", padding="same"),
    case(padding_mode="replicate", padding=2, kernel=5),
    case(bias=False),
    case(batch=1),
    case(batch=7, spatial=(7, 11)),
    case(kernel=(3, 5), stride=(2, 1), padding=(1, 2), spatial=(9, 7)),
    case(memory="channels_last"),
    case(memory="channels_last", cin=4, cout=6, groups=1),
    case(memory="noncontiguous"),
    case(memory="noncontiguous", cin=4, cout=6, groups=2),
    case(dtype=torch.float64, cin=4, cout=6, groups=2),
    case(dtype=torch.bfloat16),
    case(dtype=torch.bfloat16, cin=4, cout=6, groups=1),
    # Conv1d and Conv3d.
    case(dims=1, spatial=(17,)),
    case(dims=1, cin=6, cout=9, groups=3, stride=2, spatial=(16,)),
    case(dims=1, cin=4, cout=6, groups=1, padding_mode="circular", spatial=(10,)),
    case(dims=3, spatial=(5, 6, 4)),
    case(dims=3, cin=4, cout=6, groups=2, kernel=(3, 1, 3), padding=(1, 0, 1), spatial=(4, 5, 5)),
    case(dims=3, cin=6, cout=6, groups=6, memory="channels_last", spatial=(4, 4, 4)),
]


def _placeable(c, world):
    try:
        mpgroups.place(c["cin"], c["cout"], c["groups"], world, 0)
        return True
    except mpgroups.PlacementError:
        return False


PLACEABLE = [(c, p) for p in (2, 4) for c in CASES if _placeable(c, p)]
REFUSED = [(c, p) for p in (2, 4) for c in CASES if not _placeable(c, p)]


@pytest.mark.parametrize(
    "c, world_size", PLACEABLE, ids=lambda v: str(v) if isinstance(v, int) else case_id(v)
)
def test_parity(pool, c, world_size):
    worst = pool.run(check_layer, world_size, c)
    assert len(worst) == world_size
    assert all("output" in w and "weight grad" in w for w in worst)


@pytest.mark.parametrize(
    "c, world_size", REFUSED, ids=lambda v: str(v) if isinstance(v, int) else case_id(v)
)
def test_unplaceable_cases_are_refused(c, world_size):
    """The cases the placement rule refuses at this P (groups=3 on 4 ranks) raise, naming G
    and P, instead of running."""
    with pytest.raises(mpgroups.PlacementError, match=f"groups={c['groups']} cannot be placed"):
        check_placeable(c["groups"], world_size)
