"""Virtio itself: guest memory, split virtqueues and their two engines, the spec's constants."""
