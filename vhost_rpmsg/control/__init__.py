"""The control plane of a running server: its socket, protocol and statistics."""
