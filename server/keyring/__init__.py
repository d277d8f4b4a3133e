"""The key ring: key names, versions, the primary version and version states.

``model`` (the domain values, pure), ``state`` (the state document kept in the token),
``join`` (the pure join of state and token objects into keys) and ``ring`` (``KeyRing``: the
cache, its refresh, and the one way to change the state).
"""
