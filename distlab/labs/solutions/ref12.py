"""Lab 12: reference solutions."""


def choose_architecture(model_mib, link_gbps, machines):
    """Bytes on the busiest link over bytes per second: the ring's 2(N-1)/N·S, the server's 2(N-1)·S."""
    payload = model_mib * 2 ** 20  # bytes
    bandwidth = link_gbps * 1e9 / 8  # bytes per second, each way
    n = machines
    return {"all-reduce": 2 * (n - 1) / n * payload / bandwidth, "PS sync": 2 * (n - 1) * payload / bandwidth}


def server_bottleneck(model_mib, link_gbps, compute_s):
    """The most workers W with 2·W·S / bandwidth <= compute_s."""
    payload, bandwidth = model_mib * 2 ** 20, link_gbps * 1e9 / 8
    return int(compute_s * bandwidth // (2 * payload))
