"""The decoding engine: target backends, speculators, the controller, verification."""
