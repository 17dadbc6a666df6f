"""Consistency for data (notebook 07): a replicated key-value store and the checker of its recorded history."""
