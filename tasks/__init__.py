"""Prefect tasks: one per node class of the stage graph (resolve, task_vectors, importance, merge, evaluate,
register, promote; ``tasks/stages.py``), with their cache policies (``tasks/policies.py``).

Each task runs its node (``mergeflow.graph``) over its inputs' manifests and returns the node's small manifest
(paths, content hashes, a few numbers), never tensors. The library itself never imports Prefect.
"""
