"""Optimizers (notebook 06): the update rules from their equations, and their distributed forms."""
