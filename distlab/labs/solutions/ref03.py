"""Lab 03: reference solutions."""


def apply_push(server, grad, pulled_version):
    """Staleness first (the version now minus the one the gradient was computed on), then the update:
    async applies lr / workers * grad at once; sync collects the round and applies its mean at the last push."""
    staleness = server["version"] - pulled_version
    if server["mode"] == "async":
        server["params"] -= server["lr"] / server["workers"] * grad
        server["version"] += 1
    else:
        server["pending"].append(grad)
        if len(server["pending"]) == server["workers"]:
            server["params"] -= server["lr"] * sum(server["pending"]) / server["workers"]
            server["pending"].clear()
            server["version"] += 1
    return server["version"], staleness
