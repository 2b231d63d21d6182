"""The HTTP side of the service: request and response types, the limits applied before
the API parses anything, and BentoML's runtime options. `service.py` wires them up."""
