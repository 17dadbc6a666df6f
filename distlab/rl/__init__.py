"""Distributed reinforcement learning (notebook 10): the actor-learner split on ranks and on Ray."""
