"""One module per training algorithm; see :func:`horovod_dpsgd.DistributedOptimizer`."""
