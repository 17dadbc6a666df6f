"""Fault tolerance (notebook 11): checkpoints, injected faults, stragglers, the resilient training loop."""
