"""Generic vhost-user plumbing: codec (sans-I/O), backend state machine, server (I/O)."""
