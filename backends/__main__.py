"""``python -m backends`` lists the backends."""
print("backends: python -m backends.sink | python -m backends.relay  (--help for each)")
