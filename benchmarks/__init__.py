"""``make bench``: the unlock pipeline measured against the hardware floor (see bench_unlock.py)."""
