"""Federated learning (notebooks 05, 05b): aggregation, client data, the one-process simulation, real ranks, privacy."""
