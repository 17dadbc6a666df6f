"""Training architectures (notebooks 03, 04, 05, 07, 12): the parameter server (master-worker), gossip over a
topology (peer-to-peer), the coordinated hybrid, staleness-bounded training (BSP/SSP/ASP), federated/, and
compare (choosing one)."""
