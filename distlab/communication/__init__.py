"""Communication (notebook 02): collectives from send/recv, their cost model, compression, RPC, publish/subscribe."""
