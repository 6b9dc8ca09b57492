"""The driver of one search: reading the inputs and checking them (:mod:`.preflight`), the
run-dir lock (:mod:`.runlock`), the context strategies see (:mod:`.context`), the search
itself (:mod:`.driver`) and its result rows (:mod:`.results`)."""
