"""Where the work runs: the only package that imports ``ray``.

The pool contract and the in-process pool (:mod:`.pool`), the Ray pool and its evaluator
actors (:mod:`.ray_pool`, :mod:`.actors`), replica groups of stack-shard holders
(:mod:`.replica_group`, :mod:`.group_pool`), object refs shared by actors
(:mod:`.shared_refs`), the memory plan (:mod:`.memory`, :mod:`.planning`), the results store
(:mod:`.results_store`), starting Ray and building the pool (:mod:`.launch`), the local Ray
session (:mod:`.local_ray`), a loopback cluster (:mod:`.cluster`), Ray job submission
(:mod:`.submit`)."""
