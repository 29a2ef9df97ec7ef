"""PEFT methods. Each module in this package registers one method with ``@register_method``;
every module here is imported on package import, so a new method is one new file (plus its
config in ``configs/method/``)."""
import importlib
import pkgutil

from .base import (METHODS, AdaptedLinear, Delta, InsertedAfter, Method, NotMergeableError,
                   PeftModule, adapt_linears, count_parameters, get_method, insert_after, merge,
                   register_method)

# the shared mechanism, not methods
MECHANISM = {"base", "batched", "merging", "registry", "targeting", "weights", "wrappers"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in MECHANISM:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "AdaptedLinear", "Delta", "InsertedAfter", "Method", "NotMergeableError",
           "PeftModule", "adapt_linears", "count_parameters", "get_method", "insert_after",
           "merge", "register_method"]
