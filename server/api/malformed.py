"""Request bodies that are not the method's message: INVALID_ARGUMENT, not INTERNAL.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!") and logs a traceback, so a caller's garbage looked like a daemon
fault (found by tests/integration/test_malformed_requests.py). ``server.api.dispatch`` gives
each unary method a deserializer that hands the pipeline :data:`MALFORMED` instead, and the
pipeline's ``well_formed`` stage answers INVALID_ARGUMENT with one line (and the usual
access-log line).
"""

from __future__ import annotations


class _Malformed:
    """What the lenient deserializer hands over instead of a message it could not parse."""

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = _Malformed()
