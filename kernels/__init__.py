"""Triton kernels of the learned step and their launchers (imported lazily; this file has no side effects)."""
