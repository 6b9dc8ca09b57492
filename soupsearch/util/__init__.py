"""Small helpers every layer may use: atomic file writes (:mod:`.fileio`), file-name and
path guards (:mod:`.safety`), secret redaction (:mod:`.redact`), byte sizes (:mod:`.units`),
timeouts (:mod:`.timeouts`) and progress lines (:mod:`.progress`). Nothing here imports the
rest of soupsearch except :mod:`soupsearch.errors`."""
