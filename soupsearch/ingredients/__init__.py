"""The ingredients, before any search: discovery of checkpoints and manifests
(:mod:`.discovery`), safe checkpoint and tensor readers (:mod:`.checkpoints`, :mod:`.tensors`),
the flat parameter layout (:mod:`.layout`), headers and column shards of the stack
(:mod:`.columns`), and permutation alignment (:mod:`.rebasin`, :mod:`.align` for a sweep)."""
