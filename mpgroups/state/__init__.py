"""State: full and sharded state dicts of a parallel model, and checkpoints written
atomically and read without executing pickled code.
"""
