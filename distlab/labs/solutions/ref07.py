"""Lab 07: reference solutions."""


def ssp_gate(clock, clocks, s, dead=frozenset()):
    """A worker may proceed while it is at most s clocks ahead of the slowest live worker."""
    slowest = min(c for worker, c in clocks.items() if worker not in dead)
    return clock - slowest <= s


def quorum_read_write(replies, value=None, writer=None):
    """Read: the reply with the highest version. Write: one past the highest counter seen, tagged with the writer."""
    newest = max(replies, key=lambda reply: reply[1])
    if value is None:
        return newest
    return (newest[1][0] + 1, writer)
