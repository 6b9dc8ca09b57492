"""Merging models fine-tuned on different tasks: shared body merged, per-task heads kept.

A config with a top-level ``tasks:`` key runs :func:`~.driver.run_multitask` (``soupsearch
run``, Ray jobs). See the README's "Multi-task merging" section.
"""

from soupsearch.multitask.config import MultiTaskConfig, load_multitask_config, multitask_config_from_dict
from soupsearch.multitask.heads import split_head

__all__ = ["MultiTaskConfig", "load_multitask_config", "multitask_config_from_dict", "split_head", "run_multitask"]


def run_multitask(cfg, tracker=None):
    from soupsearch.multitask.driver import run_multitask as _run

    return _run(cfg, tracker)
