"""The two-tower AlexNet of 2012 (Krizhevsky, Sutskever, Hinton), group-parallel.

Layers (channels as in the paper; ``channels`` and ``hidden`` scale them)::

    features.conv1  11x11/4  in  -> 96         column-parallel (groups=1, filters split)
    features.conv2   5x5    96  -> 256  groups=2   towers: no communication
    features.conv3   3x3   256  -> 384         groups mix: all-gather in, filters split
    features.conv4   3x3   384  -> 384  groups=2   towers
    features.conv5   3x3   384  -> 256  groups=2   towers
    features.pool5  adaptive max pool to 6x6, still sharded; flatten -> 256*6*6 feature shards
    classifier.0    dropout on the feature shards (the whole tensor's mask, own slice kept)
    classifier.1    fc6  9216 -> 4096   row-parallel: reads the feature shards, all-reduce
    classifier.4    fc7  4096 -> 4096   column-parallel: output features sharded
    classifier.6    fc8  4096 -> classes  row-parallel: all-reduce

Each conv is followed by ReLU (and BatchNorm with ``batch_norm=True``); max pools of 3/2 after
conv1 and conv2. The last pool is an adaptive max pool to 6x6 (the same windows as the
paper's 3/2 pool on 13x13), so any input of at least 31x31 works. Local response
normalisation is left out, as in torchvision's AlexNet.

Built by :func:`mpgroups.parallelize` with :meth:`AlexNet.parallel_plan`, the split of the
2012 paper classifier included: activations stay sharded by channel from conv1 to fc6, every
layer holds 1/P of its weights, and a training step communicates at conv3 (all-gather forward,
reduce-scatter backward), fc6 and fc8 (all-reduce forward) and fc7 (all-reduce of its input
grad backward), plus the within-team gathers when the process group has more ranks than the
layers have groups (P = 4). ``split_classifier=False`` keeps the classifier replicated (the
towers alone, all-gather after pool5). With no process group it is a plain single-device
model, and its ``state_dict`` keys are the same at every P and with either plan.
"""

from __future__ import annotations

from torch import Tensor, nn

from mpgroups.comm.process_groups import resolve_process_group
from mpgroups.layers.dtensor_state import local_tensor
from mpgroups.plans.parallelize import parallelize
from mpgroups.plans.styles import ChannelLocal, ParallelLayer
from mpgroups.state.state_dict import local_parameter_bytes

__all__ = ["AlexNet"]

MIN_SIZE = 31


class AlexNet(nn.Module):
    """Two-tower AlexNet, built group-parallel over ``process_group``.

    Args:
        num_classes: classifier outputs.
        in_channels: input image channels.
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (default group if
            ``torch.distributed`` is initialised, else single-device).
        channels: output channels of conv1..conv5 (paper: 96, 256, 384, 384, 256); conv2,
            conv4 and conv5 use two groups, so those must be even.
        hidden: width of the two hidden classifier layers (paper: 4096).
        dropout: dropout probability in the classifier (on the feature shards too: a run at
            any P drops exactly what one device drops, given the same seed on every rank).
        batch_norm: add ``BatchNorm2d`` after each conv (run on each rank's channel shard).
        parallel: ``False`` builds the plain ``torch.nn`` model whatever the process group
            (the single-device reference, or the model to wrap in DDP); same ``state_dict``.
        split_classifier: split the classifier as the 2012 paper did (default); ``False``
            keeps it replicated on every rank.

    Shapes: input ``[N, in_channels, H, W]`` with ``H, W >= 31`` (replicated on every rank),
    output ``[N, num_classes]`` (replicated).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        process_group=None,
        channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256),
        hidden: int = 4096,
        dropout: float = 0.5,
        batch_norm: bool = False,
        parallel: bool = True,
        split_classifier: bool = True,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.batch_norm = batch_norm
        stages = [
            ("conv1", nn.Conv2d(in_channels, c1, 11, stride=4, padding=2), "pool1"),
            ("conv2", nn.Conv2d(c1, c2, 5, padding=2, groups=2), "pool2"),
            ("conv3", nn.Conv2d(c2, c3, 3, padding=1), None),
            ("conv4", nn.Conv2d(c3, c4, 3, padding=1, groups=2), None),
            ("conv5", nn.Conv2d(c4, c5, 3, padding=1, groups=2), "pool5"),
        ]
        features = nn.Sequential()
        for name, conv, pool in stages:
            features.add_module(name, conv)
            if batch_norm:
                features.add_module(f"bn{name[-1]}", nn.BatchNorm2d(conv.out_channels))
            features.add_module(f"relu{name[-1]}", nn.ReLU(inplace=True))
            if pool == "pool5":
                features.add_module(pool, nn.AdaptiveMaxPool2d(6))
            elif pool is not None:
                features.add_module(pool, nn.MaxPool2d(3, stride=2))
        self.features = features
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * 6 * 6, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        pg = resolve_process_group(process_group) if parallel else None
        self.world_size = 1 if pg is None else pg.size()
        if parallel:
            # The group as given: a DeviceMesh dim stays the mesh its DTensors live on.
            parallelize(self, process_group, plan=self.parallel_plan(batch_norm, split_classifier))

    @staticmethod
    def parallel_plan(batch_norm: bool = False, split_classifier: bool = True) -> dict:
        """The plan of the whole network (see the module docstring); with
        ``split_classifier=False``, the towers conv1..pool5 and a replicated classifier."""
        sharded = ParallelLayer(input_layout="sharded", output_layout="sharded")
        plan = {
            "features.conv1": ParallelLayer(output_layout="sharded"),
            "features.conv2": sharded,
            "features.conv3": sharded,
            "features.conv4": sharded,
            "features.conv5": sharded,
        }
        if batch_norm:
            plan["features.bn*"] = ChannelLocal()
        if not split_classifier:
            plan["features.pool5"] = ChannelLocal(output_layout="replicated")
            return plan
        plan |= {
            "flatten": ChannelLocal(),
            "classifier.0": ChannelLocal(),
            # fc6 reads the flattened conv5 shards: features laid out as conv5's two groups.
            "classifier.1": ParallelLayer(split="rowwise", input_layout="sharded", shard_groups=2),
            "classifier.4": ParallelLayer(output_layout="sharded"),
            "classifier.6": ParallelLayer(split="rowwise", input_layout="sharded"),
        }
        return plan

    @staticmethod
    def tower_plan(batch_norm: bool = False) -> dict:
        """The towers alone: ``parallel_plan(batch_norm, split_classifier=False)``."""
        return AlexNet.parallel_plan(batch_norm, split_classifier=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(
                f"AlexNet expects [N, C, H, W] with H, W >= {MIN_SIZE}, got {tuple(x.shape)}"
            )
        return self.classifier(self.flatten(self.features(x)))

    def extra_repr(self) -> str:
        nbytes = local_parameter_bytes(self)
        count = sum(local_tensor(p).numel() for p in self.parameters())
        return (
            f"world_size={self.world_size}, parameters on this rank: {count:,} "
            f"({nbytes / 2**20:.1f} MiB)"
        )
