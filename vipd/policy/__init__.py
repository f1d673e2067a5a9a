"""Early checks at the VIP: pure decisions from gathered facts to a verdict (DNS gathered asynchronously)."""
