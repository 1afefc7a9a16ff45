"""Snapshots ("Nyx"): boot a template once, snapshot it, restore every sandbox copy-on-write from it."""
