"""Merge methods: pure per-tensor kernels and their registry."""

from mergeflow.methods.base import KernelInput, MergeMethod, ParamSpec, all_methods, get_method

__all__ = ["KernelInput", "MergeMethod", "ParamSpec", "all_methods", "get_method"]
