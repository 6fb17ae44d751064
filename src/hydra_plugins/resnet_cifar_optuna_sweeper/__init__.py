"""resnet-cifar's Hydra sweeper: an Optuna (>= 4) search whose trials are training jobs, pruned when they lag.

Hydra finds it by scanning the ``hydra_plugins`` namespace package; it imports every public
module here at each start of every Hydra app, so these import only Hydra (Optuna and the project's
code are imported when a search runs, by the ``_search`` module, which the scan skips).
"""
