"""Gaussian Instance Tracing (Trace3D): sparse per-Gaussian instance traces, consistent instance
maps, ambiguity scores and consistency metrics. Import the submodules directly; this package
imports nothing heavy.
"""
