"""Training architectures: parameter server (master-worker), decentralized gossip (peer-to-peer), federated learning."""
