"""Scoring, in plain torch (no Ray): the per-shard evaluator (:mod:`.evaluator`), metrics and
counts (:mod:`.metrics`), selection rules (:mod:`.selection`), significance tests
(:mod:`.significance`), BatchNorm reset (:mod:`.bnreset`), Fisher information (:mod:`.fisher`),
the gradient soup's inner loop (:mod:`.gradsoup`), loss barriers (:mod:`.barriers`), the
chance-level warning (:mod:`.chance`) and the multi-task evaluator (:mod:`.multitask`)."""
