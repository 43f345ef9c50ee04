"""MLflow tracking: the local server and the runs each experiment logs to."""
