from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "context", "dense", "candidates")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DenseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    context: _containers.ScalarMap[str, int]
    dense: _containers.ScalarMap[str, float]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, user_id: _Optional[int] = ..., context: _Optional[_Mapping[str, int]] = ..., dense: _Optional[_Mapping[str, float]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "embedding")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model_version", "tokenized")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZED_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    tokenized: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., tokenized: _Optional[_Iterable[bool]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, items: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("code_names", "items", "model_version")
    CODE_NAMES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    code_names: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[ItemCodes]
    model_version: str
    def __init__(self, code_names: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[ItemCodes, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ItemCodes(_message.Message):
    __slots__ = ("item_id", "codes")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, item_id: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ...) -> None: ...
