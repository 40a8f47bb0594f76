"""Where rows outlive the process: a small `Store` protocol (SQLite, PostgreSQL), the tables and
migrations a component declares once for both, and the shared writer that batches rows off the
request path, survives an outage and spills what it cannot hold to a local file."""
