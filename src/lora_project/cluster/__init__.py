"""Scale-out on Ray (`--cluster ADDRESS`): the same training recipe and scoring functions as Ray tasks.

A workflow package (DESIGN.md conventions 12-13). Nothing here imports Ray at module level:
``ray`` is imported inside the functions that connect, so a command without ``--cluster`` never
loads it. `address` parses and probes ADDRESS; `connect` starts or joins the cluster; `train`
runs train-batch's and train --seeds' adapters as tasks; `sweep` runs a sweep's trials as tasks
(the study stays with the driver, pruning through an actor); `evaluate` and `matrix` score minimal-pair
shards and cross-evaluation cells as tasks; `tasks` holds the functions the workers run; `record`
writes a task's result into the project; `progress` shows the runs while they train (the progress
actor, the files the web board reads, the overall bar).
"""
