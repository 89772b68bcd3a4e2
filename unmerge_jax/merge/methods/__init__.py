"""The merge-method registry: ``MERGE_METHODS`` maps a mergekit method name to its :class:`MergeMethod`.

One file per method family builds the entries (``gta.py``: generalized task arithmetic;
``ram.py``: Reinforced Agent Merging, every face). A new method is one entry in its family's file
(or a new file) and one line here; the CLI's choices, the config validation and the shared test
file ``tests/test_merge_registry.py`` all read this dict.
"""

from unmerge_jax.merge.base import MergeMethod  # noqa: F401
from unmerge_jax.merge.methods import gta, ram
from unmerge_jax.merge.methods import fusion, karcher, nearswap, slerp

MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": gta.LINEAR,
    "task_arithmetic": gta.TASK_ARITHMETIC,
    "ties": gta.TIES,
    "dare_linear": gta.DARE_LINEAR,
    "dare_ties": gta.DARE_TIES,
    "ram": ram.RAM,
    "ramplus_tl": ram.RAMPLUS_TL,
    "slerp": slerp.SLERP,
    "nuslerp": slerp.NUSLERP,
    "multislerp": slerp.MULTISLERP,
    "karcher": karcher.KARCHER,
    "nearswap": nearswap.NEARSWAP,
    "arcee_fusion": fusion.ARCEE_FUSION,
}
