"""The REST API, one router per resource; `tartarus.daemon.app` assembles them into the daemon's app.

Handlers are module-level functions. What they need from the daemon (the sandbox manager, the control
plane, the image cache) comes in through the dependencies in `deps`, never through closures.
"""
