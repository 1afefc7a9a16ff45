"""Hibernation ("Hypnos"): a running guest's memory captured relative to its template snapshot (QEMU's
migration stream, filtered to the pages the sandbox wrote), so an idle sandbox holds no process and no
RAM and costs only what it changed. Hibernating, waking, checkpoints and forks themselves, with their
commit points, are the sandbox's verbs (`tartarus.sandbox`)."""
