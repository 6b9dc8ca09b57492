"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/soup_search.py CONFIG`.

Same as `python -m soupsearch.jobs CONFIG`; kept here so the job's entry point is
visible in the repository."""

import sys

from soupsearch.jobs import main

if __name__ == "__main__":
    sys.exit(main())
