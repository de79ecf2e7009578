"""Prefect flows composed from ``tasks``: the merge pipeline, the sweep and the demo flow."""
