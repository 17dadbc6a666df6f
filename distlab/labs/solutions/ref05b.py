"""Lab 05b: reference solutions."""


def pairwise_masks(client, update, num_clients, secret, prg):
    """Add the mask shared with each later client, subtract the one shared with each earlier client; a
    pair's seed is built from (secret, min, max), so both clients of the pair draw the same mask."""
    out = [t.clone() for t in update]
    for other in range(num_clients):
        if other == client:
            continue
        low, high = min(client, other), max(client, other)
        mask = prg((secret * num_clients + low) * num_clients + high, update)
        sign = 1.0 if client < other else -1.0
        for o, m in zip(out, mask):
            o.add_(m, alpha=sign)
    return out


def krum_scores(updates, num_malicious):
    """Per update: the sum of its squared distances to its n - f - 2 nearest other updates."""
    n = len(updates)
    closest = max(1, n - num_malicious - 2)
    squared = ((updates.unsqueeze(0) - updates.unsqueeze(1)) ** 2).sum(-1)
    return squared.sort(dim=1).values[:, 1:closest + 1].sum(1)
