"""Prefect tasks: one per pipeline stage (resolve, task_vectors, importance, merge, evaluate, register).

Each task is a thin, cacheable wrapper over the ``mergeflow`` library that returns a small manifest (paths, content
hashes, a few numbers), never tensors. The library itself never imports Prefect.
"""
