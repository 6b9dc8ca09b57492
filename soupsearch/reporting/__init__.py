"""What a finished search shows: terminal tables (:mod:`.tables`), plots (:mod:`.plots`) and
``soupsearch compare`` over MLflow runs (:mod:`.compare`)."""
