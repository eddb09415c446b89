"""Where channels live: the placement rule and the layouts built on it.

Pure arithmetic on channel counts and ranks; nothing here imports ``torch.distributed``.
"""
