"""Lab 07b: reference solution."""


def quorum_read(store, key):
    """The newest of R replies, stored on W replicas before it is returned (read repair)."""
    replies = store.ask(key)
    value, version = max(replies.values(), key=lambda reply: reply[1])
    holders = [rank for rank, (_, seen) in replies.items() if seen == version]
    store.store_on(key, value, version, holders=holders)
    return value, version
