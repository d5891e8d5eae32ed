"""vhost-rpmsg: a user-space vhost-user backend serving RPMsg to virtual machines."""

__version__ = "0.1.0"
