"""Corolla's exception tree, shared by the gateway and the blockservers.

    CorollaError
    ├── BadRequest            the caller's input is wrong; never retried
    │   ├── UnsupportedModel  no adapter for this architecture
    │   └── ModelMismatch     a peer serves a different model than the one asked for
    ├── ModelNotFound         a model reference that resolves to nothing
    ├── Unavailable           a server or chain cannot serve now; retryable elsewhere
    │   ├── CacheFull         no KV-cache room within the allocation timeout (back-pressure, not a fault)
    │   ├── Overloaded        the gateway's admission queue is full or the wait ran out (HTTP 429)
    │   ├── SessionLost       a server dropped a session (socket closed, no reply): a fault
    │   ├── SessionExpired    a server freed an idle session; the peer was slow, not the server
    │   ├── Unauthorized      a server refused a session no gateway it serves has granted
    │   └── WrongResult       a server's result failed verification: a fault worth a ban
    └── ProtocolError         a peer sent a message that breaks the wire protocol (a fault)

Foreign exceptions are translated at one boundary (`raise Unavailable(...) from exc`).
Each class carries a stable `code` string that travels in error frames; `for_code` maps it back.
"""

from __future__ import annotations


class CorollaError(Exception):
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @staticmethod
    def for_code(code: object) -> type[CorollaError]:
        """The class an error frame's `code` names; unknown codes are Unavailable (retry elsewhere)."""
        return _BY_CODE.get(code, Unavailable) if isinstance(code, str) else Unavailable


class BadRequest(CorollaError):
    code = "bad_request"


class UnsupportedModel(BadRequest):
    code = "unsupported_model"


class ModelMismatch(BadRequest):
    code = "model_mismatch"


class ModelNotFound(CorollaError):
    code = "model_not_found"


class Unavailable(CorollaError):
    code = "unavailable"


class CacheFull(Unavailable):
    code = "cache_full"


class Overloaded(Unavailable):
    code = "overloaded"


class SessionLost(Unavailable):
    code = "session_lost"


class SessionExpired(Unavailable):
    code = "session_expired"


class Unauthorized(Unavailable):
    code = "unauthorized"


class WrongResult(Unavailable):
    code = "wrong_result"


class ProtocolError(CorollaError):
    code = "protocol_error"


def _subclasses(cls: type[CorollaError]) -> list[type[CorollaError]]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


_BY_CODE: dict[str, type[CorollaError]] = {c.code: c for c in _subclasses(CorollaError)}
