"""Weight-space merging: the recipe and the mixing loop over the stack (:mod:`.mixing`), one
per-tensor kernel per method (:mod:`.methods`), the in-memory API (:mod:`.api`:
``soupsearch.merge`` and friends) and the streaming file merge behind ``soupsearch merge``
(:mod:`.streaming`)."""
