"""Plans: the styles that describe how modules run in parallel, ``parallelize`` that applies
them, ``auto_plan`` that derives them from a traced model, the styles for torch's
``parallelize_module``, and the global-batch conversion for a data-parallel mesh axis.
"""
