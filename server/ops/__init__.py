"""The daemon's operations as plain functions of (token, key ring or key version, values):
``signing``, ``capgo`` (the Capgo raw operations), ``unwrap`` and ``keyadmin``. They check
their inputs and raise ``server.errors`` types; the gRPC face is ``server.api``."""
