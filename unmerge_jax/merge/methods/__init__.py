"""The merge-method registry: ``MERGE_METHODS`` maps a mergekit method name to its :class:`MergeMethod`.

One file per method family builds the entries (``gta.py``: generalized task arithmetic;
``ram.py``: Reinforced Agent Merging, every face). A new method is one entry in its family's file
(or a new file) and one line here; the CLI's choices, the config validation and the shared test
file ``tests/test_merge_registry.py`` all read this dict.
"""

from unmerge_jax.merge.base import MergeMethod  # noqa: F401
from unmerge_jax.merge.methods import fusion, gta, karcher, model_stock, nearswap, passthrough, ram, sce, slerp

MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": gta.LINEAR,
    "task_arithmetic": gta.TASK_ARITHMETIC,
    "ties": gta.TIES,
    "dare_linear": gta.DARE_LINEAR,
    "dare_ties": gta.DARE_TIES,
    "ram": ram.RAM,
    "ramplus_tl": ram.RAMPLUS_TL,
    "passthrough": passthrough.PASSTHROUGH,
    "model_stock": model_stock.MODEL_STOCK,
    "breadcrumbs": gta.BREADCRUMBS,
    "breadcrumbs_ties": gta.BREADCRUMBS_TIES,
    "della": gta.DELLA,
    "della_linear": gta.DELLA_LINEAR,
    "sce": sce.SCE,
    "slerp": slerp.SLERP,
    "nuslerp": slerp.NUSLERP,
    "multislerp": slerp.MULTISLERP,
    "karcher": karcher.KARCHER,
    "nearswap": nearswap.NEARSWAP,
    "arcee_fusion": fusion.ARCEE_FUSION,
}
