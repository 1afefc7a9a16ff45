"""Guest-side artefacts: the microVM kernel and the agent initramfs, built from inputs in the repo."""
