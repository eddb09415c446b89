"""Communication: process groups, the collectives (autograd functions with their duals), the
input checks exchanged before them, the explicit channel transfers, and the counter that
records what they move. Only :mod:`mpgroups.comm.collectives` calls ``torch.distributed``
collectives.
"""
