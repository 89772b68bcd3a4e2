"""Passes over the weights, one tensor (or row block) at a time, reading through tensor sources.

* :mod:`~unmerge_jax.passes.mask` — the top-k mask pass: which parameter rows enter a
  decomposition (:class:`~unmerge_jax.passes.mask.Selection`).
* :mod:`~unmerge_jax.passes.statistics` — the checkpoint statistics pass: the selected rows of
  every task vector → :class:`~unmerge_jax.stats.GramStats`, on any number of devices and processes.
"""
