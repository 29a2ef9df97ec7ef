"""Hydra finds launchers only in the `hydra_plugins` namespace (and instantiates only classes
defined there), so peft_vit's sweep launchers are exposed here; the code is in
peft_vit/engine/launcher.py. This directory has no __init__.py on purpose: it joins the
installed `hydra_plugins` namespace package whenever the repo root is on sys.path (it is for
`python train.py`, and the launchers put it on the jobs' PYTHONPATH)."""
from peft_vit.engine import launcher as _impl

_impl.register_configs()


class SlurmLauncher(_impl.SlurmLauncher):
    """configs/hydra/launcher/slurm.yaml"""


class LocalLauncher(_impl.LocalLauncher):
    """configs/hydra/launcher/local.yaml"""
