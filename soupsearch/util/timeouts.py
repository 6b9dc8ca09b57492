"""Every timeout and poll interval of soupsearch, in seconds, named in one place.

Timeouts bound how long something may take before it counts as failed (and the error says
which); polls are how often a loop looks again. Values a user may need to change on a slow
cluster are config keys too (``eval.collective_timeout``)."""

# --- Ray: connecting, starting actors, waiting for results
RAY_CONNECT_S = 5.0  # a Ray address must accept a TCP connection within this
ACTOR_START_S = 600.0  # evaluator / holder actors must all be up within this (image pulls, big stacks)
RESULT_POLL_S = 0.5  # ray.wait on shard results; also how often dead actors are noticed
GROUP_MEMBER_INFO_S = 60.0  # a replica group's restarted member must answer within this
GROUP_RETRY_POLL_S = 0.5  # between attempts to form a replica group again
COLLECTIVE_S = 60.0  # default of eval.collective_timeout (one all-reduce of a replica group)
SHARED_ACTOR_S = 60.0  # the named actor holding the eval splits must appear within this
SHARED_ACTOR_POLL_S = 0.05
RAY_PROCESS_EXIT_POLL_S = 0.1  # while waiting for a local Ray's processes to exit

# --- the local cluster (`soupsearch cluster up`) and Ray jobs
CLUSTER_START_S = 120.0  # every node must have joined within this
CLUSTER_HTTP_PROBE_S = 5.0  # one request to the dashboard
CLUSTER_POLL_S = 1.0
CLUSTER_STOP_POLL_S = 0.2
JOB_AGENT_WAIT_S = 120.0  # right after `ray start` the job agent may not accept jobs yet
JOB_SUBMIT_RETRY_S = 2.0
JOB_STATUS_POLL_S = 1.0

# --- MLflow
MLFLOW_CONNECT_S = 10.0  # the tracking server must answer within this before the search starts
