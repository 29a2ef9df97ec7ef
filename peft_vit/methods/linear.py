"""Linear probe: the backbone is frozen, only the classifier head trains."""
from .base import Method, register_method


@register_method("linear")
class LinearProbe(Method):
    def __init__(self):
        pass
