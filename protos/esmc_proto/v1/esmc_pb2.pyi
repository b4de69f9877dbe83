from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_NONE: _ClassVar[Pooling]

class ScoringMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_METHOD_UNSPECIFIED: _ClassVar[ScoringMethod]
    WT_MARGINALS: _ClassVar[ScoringMethod]
    MASKED_MARGINALS: _ClassVar[ScoringMethod]
    PSEUDO_LIKELIHOOD: _ClassVar[ScoringMethod]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_FULL: _ClassVar[Normalization]
    NORMALIZATION_AMINO_ACIDS: _ClassVar[Normalization]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
POOLING_UNSPECIFIED: Pooling
POOLING_MEAN: Pooling
POOLING_NONE: Pooling
SCORING_METHOD_UNSPECIFIED: ScoringMethod
WT_MARGINALS: ScoringMethod
MASKED_MARGINALS: ScoringMethod
PSEUDO_LIKELIHOOD: ScoringMethod
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_FULL: Normalization
NORMALIZATION_AMINO_ACIDS: Normalization

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ESMProtein(_message.Message):
    __slots__ = ("sequence", "secondary_structure", "sasa")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SASA_FIELD_NUMBER: _ClassVar[int]
    sequence: str
    secondary_structure: str
    sasa: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, sequence: _Optional[str] = ..., secondary_structure: _Optional[str] = ..., sasa: _Optional[_Iterable[float]] = ...) -> None: ...

class ESMProteinTensor(_message.Message):
    __slots__ = ("sequence", "structure", "secondary_structure", "sasa", "function")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SASA_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    sequence: _containers.RepeatedScalarFieldContainer[int]
    structure: _containers.RepeatedScalarFieldContainer[int]
    secondary_structure: _containers.RepeatedScalarFieldContainer[int]
    sasa: _containers.RepeatedScalarFieldContainer[int]
    function: Tensor
    def __init__(self, sequence: _Optional[_Iterable[int]] = ..., structure: _Optional[_Iterable[int]] = ..., secondary_structure: _Optional[_Iterable[int]] = ..., sasa: _Optional[_Iterable[int]] = ..., function: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ResponseMetadata(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size", "batch_tokens", "forwards", "model", "weights_sha256", "dtype", "server_version")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    batch_tokens: int
    forwards: int
    model: str
    weights_sha256: str
    dtype: str
    server_version: str
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., forwards: _Optional[int] = ..., model: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., dtype: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_size", "max_wait_ms", "max_queue", "packed")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    packed: bool
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., max_queue: _Optional[int] = ..., packed: _Optional[bool] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "d_model", "n_heads", "n_layers", "vocabulary", "max_length", "dtype", "device", "batching", "max_message_bytes", "server_version", "logits_width", "trained_context", "models")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOGITS_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TRAINED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    d_model: int
    n_heads: int
    n_layers: int
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    dtype: str
    device: str
    batching: BatchingLimits
    max_message_bytes: int
    server_version: str
    logits_width: int
    trained_context: int
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, model_name: _Optional[str] = ..., d_model: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_layers: _Optional[int] = ..., vocabulary: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., max_message_bytes: _Optional[int] = ..., server_version: _Optional[str] = ..., logits_width: _Optional[int] = ..., trained_context: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "aliases", "is_default", "d_model", "n_heads", "n_layers", "max_length", "dtype", "devices", "batching", "weights_sha256", "weights_bytes", "activation_bytes", "trained_context")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    is_default: bool
    d_model: int
    n_heads: int
    n_layers: int
    max_length: int
    dtype: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    batching: BatchingLimits
    weights_sha256: str
    weights_bytes: int
    activation_bytes: int
    trained_context: int
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., is_default: _Optional[bool] = ..., d_model: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_layers: _Optional[int] = ..., max_length: _Optional[int] = ..., dtype: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., weights_sha256: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., trained_context: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("protein",)
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    protein: ESMProtein
    def __init__(self, protein: _Optional[_Union[ESMProtein, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: ESMProteinTensor
    def __init__(self, tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: ESMProteinTensor
    def __init__(self, tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("protein",)
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    protein: ESMProtein
    def __init__(self, protein: _Optional[_Union[ESMProtein, _Mapping]] = ...) -> None: ...

class LogitsConfig(_message.Message):
    __slots__ = ("sequence", "return_embeddings", "return_hidden_states", "ith_hidden_layer", "return_mean_embedding", "return_mean_hidden_states", "structure", "secondary_structure", "sasa", "function", "residue_annotations")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RETURN_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ITH_HIDDEN_LAYER_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEAN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEAN_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SASA_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    RESIDUE_ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    sequence: bool
    return_embeddings: bool
    return_hidden_states: bool
    ith_hidden_layer: int
    return_mean_embedding: bool
    return_mean_hidden_states: bool
    structure: bool
    secondary_structure: bool
    sasa: bool
    function: bool
    residue_annotations: bool
    def __init__(self, sequence: _Optional[bool] = ..., return_embeddings: _Optional[bool] = ..., return_hidden_states: _Optional[bool] = ..., ith_hidden_layer: _Optional[int] = ..., return_mean_embedding: _Optional[bool] = ..., return_mean_hidden_states: _Optional[bool] = ..., structure: _Optional[bool] = ..., secondary_structure: _Optional[bool] = ..., sasa: _Optional[bool] = ..., function: _Optional[bool] = ..., residue_annotations: _Optional[bool] = ...) -> None: ...

class ForwardTrackData(_message.Message):
    __slots__ = ("sequence", "structure", "secondary_structure", "sasa", "function")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SASA_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    sequence: Tensor
    structure: Tensor
    secondary_structure: Tensor
    sasa: Tensor
    function: Tensor
    def __init__(self, sequence: _Optional[_Union[Tensor, _Mapping]] = ..., structure: _Optional[_Union[Tensor, _Mapping]] = ..., secondary_structure: _Optional[_Union[Tensor, _Mapping]] = ..., sasa: _Optional[_Union[Tensor, _Mapping]] = ..., function: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LogitsRequest(_message.Message):
    __slots__ = ("protein", "tokens", "config", "output_dtype", "model")
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    protein: ESMProtein
    tokens: ESMProteinTensor
    config: LogitsConfig
    output_dtype: DType
    model: str
    def __init__(self, protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., config: _Optional[_Union[LogitsConfig, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., model: _Optional[str] = ...) -> None: ...

class LogitsResponse(_message.Message):
    __slots__ = ("logits", "embeddings", "hidden_states", "mean_embedding", "mean_hidden_states", "hidden_layers", "metadata")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MEAN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MEAN_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    logits: ForwardTrackData
    embeddings: Tensor
    hidden_states: Tensor
    mean_embedding: Tensor
    mean_hidden_states: Tensor
    hidden_layers: _containers.RepeatedScalarFieldContainer[int]
    metadata: ResponseMetadata
    def __init__(self, logits: _Optional[_Union[ForwardTrackData, _Mapping]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., mean_embedding: _Optional[_Union[Tensor, _Mapping]] = ..., mean_hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., hidden_layers: _Optional[_Iterable[int]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("id", "protein", "tokens", "layer", "pooling", "output_dtype", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    protein: ESMProtein
    tokens: ESMProteinTensor
    layer: int
    pooling: Pooling
    output_dtype: DType
    model: str
    def __init__(self, id: _Optional[str] = ..., protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., layer: _Optional[int] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("id", "embedding", "error", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    embedding: Tensor
    error: Error
    metadata: ResponseMetadata
    def __init__(self, id: _Optional[str] = ..., embedding: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class SamplingTrackConfig(_message.Message):
    __slots__ = ("temperature", "top_p", "only_sample_masked_tokens", "invalid_ids", "topk_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    ONLY_SAMPLE_MASKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INVALID_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    only_sample_masked_tokens: bool
    invalid_ids: _containers.RepeatedScalarFieldContainer[int]
    topk_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., only_sample_masked_tokens: _Optional[bool] = ..., invalid_ids: _Optional[_Iterable[int]] = ..., topk_logprobs: _Optional[int] = ...) -> None: ...

class SamplingConfig(_message.Message):
    __slots__ = ("sequence", "structure", "secondary_structure", "sasa", "function", "return_per_residue_embeddings", "return_mean_embedding")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SASA_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    RETURN_PER_RESIDUE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEAN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    sequence: SamplingTrackConfig
    structure: SamplingTrackConfig
    secondary_structure: SamplingTrackConfig
    sasa: SamplingTrackConfig
    function: SamplingTrackConfig
    return_per_residue_embeddings: bool
    return_mean_embedding: bool
    def __init__(self, sequence: _Optional[_Union[SamplingTrackConfig, _Mapping]] = ..., structure: _Optional[_Union[SamplingTrackConfig, _Mapping]] = ..., secondary_structure: _Optional[_Union[SamplingTrackConfig, _Mapping]] = ..., sasa: _Optional[_Union[SamplingTrackConfig, _Mapping]] = ..., function: _Optional[_Union[SamplingTrackConfig, _Mapping]] = ..., return_per_residue_embeddings: _Optional[bool] = ..., return_mean_embedding: _Optional[bool] = ...) -> None: ...

class ForwardAndSampleRequest(_message.Message):
    __slots__ = ("protein", "tokens", "sampling_config", "seed", "output_dtype", "model")
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    protein: ESMProtein
    tokens: ESMProteinTensor
    sampling_config: SamplingConfig
    seed: int
    output_dtype: DType
    model: str
    def __init__(self, protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., sampling_config: _Optional[_Union[SamplingConfig, _Mapping]] = ..., seed: _Optional[int] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., model: _Optional[str] = ...) -> None: ...

class ForwardAndSampleResponse(_message.Message):
    __slots__ = ("protein_tensor", "protein", "entropy", "prob", "logprob", "top_prob", "topk_logprob", "topk_tokens", "per_residue_embedding", "mean_embedding", "metadata")
    PROTEIN_TENSOR_FIELD_NUMBER: _ClassVar[int]
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_PROB_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOPK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PER_RESIDUE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MEAN_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    protein_tensor: ESMProteinTensor
    protein: ESMProtein
    entropy: Tensor
    prob: Tensor
    logprob: Tensor
    top_prob: Tensor
    topk_logprob: Tensor
    topk_tokens: Tensor
    per_residue_embedding: Tensor
    mean_embedding: Tensor
    metadata: ResponseMetadata
    def __init__(self, protein_tensor: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., entropy: _Optional[_Union[Tensor, _Mapping]] = ..., prob: _Optional[_Union[Tensor, _Mapping]] = ..., logprob: _Optional[_Union[Tensor, _Mapping]] = ..., top_prob: _Optional[_Union[Tensor, _Mapping]] = ..., topk_logprob: _Optional[_Union[Tensor, _Mapping]] = ..., topk_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., per_residue_embedding: _Optional[_Union[Tensor, _Mapping]] = ..., mean_embedding: _Optional[_Union[Tensor, _Mapping]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class GenerationConfig(_message.Message):
    __slots__ = ("track", "invalid_ids", "schedule", "strategy", "num_steps", "temperature", "temperature_annealing", "top_p")
    TRACK_FIELD_NUMBER: _ClassVar[int]
    INVALID_IDS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_ANNEALING_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    track: str
    invalid_ids: _containers.RepeatedScalarFieldContainer[int]
    schedule: str
    strategy: str
    num_steps: int
    temperature: float
    temperature_annealing: bool
    top_p: float
    def __init__(self, track: _Optional[str] = ..., invalid_ids: _Optional[_Iterable[int]] = ..., schedule: _Optional[str] = ..., strategy: _Optional[str] = ..., num_steps: _Optional[int] = ..., temperature: _Optional[float] = ..., temperature_annealing: _Optional[bool] = ..., top_p: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("protein", "tokens", "config", "seed", "model")
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    protein: ESMProtein
    tokens: ESMProteinTensor
    config: GenerationConfig
    seed: int
    model: str
    def __init__(self, protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., tokens: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., config: _Optional[_Union[GenerationConfig, _Mapping]] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("step", "num_steps", "positions", "tokens", "probabilities", "entropies", "temperature", "sequence", "final", "protein", "protein_tensor", "metadata")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    PROTEIN_TENSOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    step: int
    num_steps: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    temperature: float
    sequence: str
    final: bool
    protein: ESMProtein
    protein_tensor: ESMProteinTensor
    metadata: ResponseMetadata
    def __init__(self, step: _Optional[int] = ..., num_steps: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Iterable[float]] = ..., entropies: _Optional[_Iterable[float]] = ..., temperature: _Optional[float] = ..., sequence: _Optional[str] = ..., final: _Optional[bool] = ..., protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., protein_tensor: _Optional[_Union[ESMProteinTensor, _Mapping]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class ScoreVariantsRequest(_message.Message):
    __slots__ = ("wild_type", "variants", "method", "offset", "joint_masking", "normalization", "include_saturation_map", "model")
    WILD_TYPE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    JOINT_MASKING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SATURATION_MAP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    wild_type: ESMProtein
    variants: _containers.RepeatedScalarFieldContainer[str]
    method: ScoringMethod
    offset: int
    joint_masking: bool
    normalization: Normalization
    include_saturation_map: bool
    model: str
    def __init__(self, wild_type: _Optional[_Union[ESMProtein, _Mapping]] = ..., variants: _Optional[_Iterable[str]] = ..., method: _Optional[_Union[ScoringMethod, str]] = ..., offset: _Optional[int] = ..., joint_masking: _Optional[bool] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., include_saturation_map: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class ScoreVariantsResponse(_message.Message):
    __slots__ = ("scores", "saturation_map", "saturation_columns", "masked_copies", "metadata")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SATURATION_MAP_FIELD_NUMBER: _ClassVar[int]
    SATURATION_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MASKED_COPIES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    saturation_map: Tensor
    saturation_columns: str
    masked_copies: int
    metadata: ResponseMetadata
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., saturation_map: _Optional[_Union[Tensor, _Mapping]] = ..., saturation_columns: _Optional[str] = ..., masked_copies: _Optional[int] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class PseudoLogLikelihoodRequest(_message.Message):
    __slots__ = ("id", "protein", "normalization", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROTEIN_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    protein: ESMProtein
    normalization: Normalization
    model: str
    def __init__(self, id: _Optional[str] = ..., protein: _Optional[_Union[ESMProtein, _Mapping]] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., model: _Optional[str] = ...) -> None: ...

class PseudoLogLikelihoodResponse(_message.Message):
    __slots__ = ("id", "pseudo_log_likelihood", "pseudo_perplexity", "log_probs", "masked_copies", "error", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    MASKED_COPIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    pseudo_log_likelihood: float
    pseudo_perplexity: float
    log_probs: Tensor
    masked_copies: int
    error: Error
    metadata: ResponseMetadata
    def __init__(self, id: _Optional[str] = ..., pseudo_log_likelihood: _Optional[float] = ..., pseudo_perplexity: _Optional[float] = ..., log_probs: _Optional[_Union[Tensor, _Mapping]] = ..., masked_copies: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...
