"""The daemon: owns the VMs of one state directory and serves the REST API."""
