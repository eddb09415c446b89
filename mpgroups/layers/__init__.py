"""Layers: the group-parallel convolutions, ``ParallelLinear``, the communication around a
layer's local op, and the per-channel modules that run on channel shards.
"""
