"""Templates: a named root filesystem plus how to run it (env, workdir, resources)."""
