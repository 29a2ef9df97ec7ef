"""The method author's API, in one import (``from .base import ...``).

* the registry (registry.py): :class:`Method`, :func:`register_method`, :func:`get_method`;
* placement (targeting.py): :func:`adapt_linears` with one :class:`Site` per adapted block,
  :func:`insert_after`, :func:`insert_parallel`, :func:`replace_module`;
* the modules a method adds (wrappers.py): :class:`PeftModule`, :class:`Delta`, and the wrappers
  that hold them, each :class:`Mergeable`;
* merging and counting (merging.py); the backbone's layout (peft_vit/backbone.py).

The batched layer (methods/batched/) is opt-in per method (``Method.batched``); its tools are
re-exported here for the plans written against this module.
"""
from ..backbone import BLOCK_NAME, backbone_family, block_names, layer_index
from .batched import (BatchedDeltas, ParamPack, apply_plan, attach_batched, block_onehot, low_rank_output,
                      pack_parameters)
from .merging import count_parameters, merge
from .registry import METHODS, Method, UnsupportedBackboneError, default_no_weight_decay, get_method, register_method
from .targeting import (FUSED_BLOCKS, TARGET_ALIASES, Site, adapt_linears, insert_after, insert_parallel,
                        replace_module)
from .wrappers import (AdaptedLinear, Delta, InputTap, InsertedAfter, InsertedParallel, Mergeable, NotMergeableError,
                       PeftModule, set_submodule)

_set_submodule = set_submodule  # the name method files and tests imported before the split

__all__ = [
    "METHODS", "Method", "Delta", "PeftModule", "Mergeable", "AdaptedLinear", "InsertedAfter", "InsertedParallel",
    "InputTap", "Site", "register_method", "get_method", "adapt_linears", "insert_after", "insert_parallel",
    "replace_module", "merge", "ParamPack", "pack_parameters", "BatchedDeltas", "attach_batched", "apply_plan",
    "count_parameters", "NotMergeableError", "FUSED_BLOCKS", "TARGET_ALIASES", "default_no_weight_decay",
    "block_names", "layer_index", "backbone_family", "BLOCK_NAME", "UnsupportedBackboneError", "low_rank_output",
    "block_onehot", "set_submodule",
]
