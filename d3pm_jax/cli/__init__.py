"""Layer 8, the ``d3pm-*`` commands: one module per command, their shared flags and error handling.
The top layer: may import any other; nothing in the library imports it."""
