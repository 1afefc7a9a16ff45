"""Hibernation ("Hypnos"), checkpoints and forks: a sandbox's memory and disk, captured relative to its
template snapshot, so an idle sandbox holds no process and no RAM and costs only what it changed."""
