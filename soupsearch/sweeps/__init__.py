"""Sweep builders behind ``soupsearch sweep``: the demo sweep (:mod:`.demo`), a scratch
sweep with its own pre-training (:mod:`.scratch`) and the multi-task sweep
(:mod:`.multitask`)."""
