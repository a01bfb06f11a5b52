"""The learning loop: versioned weights published by the trainer and loaded by the sidecar."""
