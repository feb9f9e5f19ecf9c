"""Corolla's exception tree, shared by the gateway and the blockservers.

    CorollaError
    ├── BadRequest            the caller's input is wrong; never retried
    │   └── UnsupportedModel  no adapter for this architecture
    ├── ModelNotFound         a model reference that resolves to nothing
    ├── Unavailable           a server or chain cannot serve now; retryable elsewhere
    │   ├── CacheFull         no KV-cache room within the allocation timeout
    │   └── SessionLost       a server dropped a session (socket closed, timeout)
    └── ProtocolError         a peer sent a message that breaks the wire protocol

Foreign exceptions are translated at one boundary (`raise Unavailable(...) from exc`).
Each class carries a stable `code` string that travels in error frames.
"""


class CorollaError(Exception):
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(CorollaError):
    code = "bad_request"


class UnsupportedModel(BadRequest):
    code = "unsupported_model"


class ModelNotFound(CorollaError):
    code = "model_not_found"


class Unavailable(CorollaError):
    code = "unavailable"


class CacheFull(Unavailable):
    code = "cache_full"


class SessionLost(Unavailable):
    code = "session_lost"


class ProtocolError(CorollaError):
    code = "protocol_error"
