"""The sandbox runtime: QEMU microVMs, the guest agent channel, disks."""
