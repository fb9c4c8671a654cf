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
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    MEAN: _ClassVar[Reduction]
    SUM: _ClassVar[Reduction]
    WEIGHTED_MEAN: _ClassVar[Reduction]
    WEIGHTED_SUM: _ClassVar[Reduction]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
REDUCTION_UNSPECIFIED: Reduction
MEAN: Reduction
SUM: Reduction
WEIGHTED_MEAN: Reduction
WEIGHTED_SUM: Reduction

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class OptionValue(_message.Message):
    __slots__ = ("float_value", "int_value", "bool_value", "string_value", "tensor_value")
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    float_value: float
    int_value: int
    bool_value: bool
    string_value: str
    tensor_value: Tensor
    def __init__(self, float_value: _Optional[float] = ..., int_value: _Optional[int] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., tensor_value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("loss", "predictions", "targets", "weights", "options", "tag", "gradient", "shared_memory_session", "per_sample_output", "more", "inputs", "per_class", "accuracy", "top_k", "diagnostics", "hardest", "quantiles", "sample_ids", "hardest_batches", "batch_id", "mergeable", "analyses_at_end")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: OptionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[OptionValue, _Mapping]] = ...) -> None: ...
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SESSION_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    HARDEST_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    HARDEST_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MERGEABLE_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_AT_END_FIELD_NUMBER: _ClassVar[int]
    loss: str
    predictions: Tensor
    targets: Tensor
    weights: Tensor
    options: _containers.MessageMap[str, OptionValue]
    tag: str
    gradient: Reduction
    shared_memory_session: str
    per_sample_output: SharedMemoryRef
    more: bool
    inputs: _containers.MessageMap[str, Tensor]
    per_class: bool
    accuracy: bool
    top_k: _containers.RepeatedScalarFieldContainer[int]
    diagnostics: bool
    hardest: int
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    sample_ids: Tensor
    hardest_batches: int
    batch_id: int
    mergeable: bool
    analyses_at_end: bool
    def __init__(self, loss: _Optional[str] = ..., predictions: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Mapping[str, OptionValue]] = ..., tag: _Optional[str] = ..., gradient: _Optional[_Union[Reduction, str]] = ..., shared_memory_session: _Optional[str] = ..., per_sample_output: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., more: _Optional[bool] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., per_class: _Optional[bool] = ..., accuracy: _Optional[bool] = ..., top_k: _Optional[_Iterable[int]] = ..., diagnostics: _Optional[bool] = ..., hardest: _Optional[int] = ..., quantiles: _Optional[_Iterable[float]] = ..., sample_ids: _Optional[_Union[Tensor, _Mapping]] = ..., hardest_batches: _Optional[int] = ..., batch_id: _Optional[int] = ..., mergeable: _Optional[bool] = ..., analyses_at_end: _Optional[bool] = ...) -> None: ...

class Aggregates(_message.Message):
    __slots__ = ("sum", "mean", "weighted_sum", "weighted_mean", "count", "ignored", "omitted", "weight_sum")
    SUM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_MEAN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    sum: float
    mean: float
    weighted_sum: float
    weighted_mean: float
    count: int
    ignored: int
    omitted: int
    weight_sum: float
    def __init__(self, sum: _Optional[float] = ..., mean: _Optional[float] = ..., weighted_sum: _Optional[float] = ..., weighted_mean: _Optional[float] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., omitted: _Optional[int] = ..., weight_sum: _Optional[float] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("per_sample", "aggregates", "running", "gradient", "analysis", "running_analysis", "diagnostics", "state")
    PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    per_sample: Tensor
    aggregates: Aggregates
    running: Aggregates
    gradient: Tensor
    analysis: Analysis
    running_analysis: Analysis
    diagnostics: Diagnostics
    state: MergeState
    def __init__(self, per_sample: _Optional[_Union[Tensor, _Mapping]] = ..., aggregates: _Optional[_Union[Aggregates, _Mapping]] = ..., running: _Optional[_Union[Aggregates, _Mapping]] = ..., gradient: _Optional[_Union[Tensor, _Mapping]] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ..., running_analysis: _Optional[_Union[Analysis, _Mapping]] = ..., diagnostics: _Optional[_Union[Diagnostics, _Mapping]] = ..., state: _Optional[_Union[MergeState, _Mapping]] = ...) -> None: ...

class MergeState(_message.Message):
    __slots__ = ("version", "loss", "options", "analyses", "samples", "batches", "aggregate", "per_class", "accuracy", "calibration", "hardest", "quantiles", "hardest_batches")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    HARDEST_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    HARDEST_BATCHES_FIELD_NUMBER: _ClassVar[int]
    version: int
    loss: str
    options: str
    analyses: AnalysisRequest
    samples: int
    batches: int
    aggregate: ExactAggregate
    per_class: ClassState
    accuracy: AccuracyState
    calibration: CalibrationState
    hardest: HardestState
    quantiles: SketchState
    hardest_batches: HardestBatchesState
    def __init__(self, version: _Optional[int] = ..., loss: _Optional[str] = ..., options: _Optional[str] = ..., analyses: _Optional[_Union[AnalysisRequest, _Mapping]] = ..., samples: _Optional[int] = ..., batches: _Optional[int] = ..., aggregate: _Optional[_Union[ExactAggregate, _Mapping]] = ..., per_class: _Optional[_Union[ClassState, _Mapping]] = ..., accuracy: _Optional[_Union[AccuracyState, _Mapping]] = ..., calibration: _Optional[_Union[CalibrationState, _Mapping]] = ..., hardest: _Optional[_Union[HardestState, _Mapping]] = ..., quantiles: _Optional[_Union[SketchState, _Mapping]] = ..., hardest_batches: _Optional[_Union[HardestBatchesState, _Mapping]] = ...) -> None: ...

class AnalysisRequest(_message.Message):
    __slots__ = ("per_class", "accuracy", "top_k", "diagnostics", "hardest", "quantiles", "hardest_batches")
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    HARDEST_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    HARDEST_BATCHES_FIELD_NUMBER: _ClassVar[int]
    per_class: bool
    accuracy: bool
    top_k: _containers.RepeatedScalarFieldContainer[int]
    diagnostics: bool
    hardest: int
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    hardest_batches: int
    def __init__(self, per_class: _Optional[bool] = ..., accuracy: _Optional[bool] = ..., top_k: _Optional[_Iterable[int]] = ..., diagnostics: _Optional[bool] = ..., hardest: _Optional[int] = ..., quantiles: _Optional[_Iterable[float]] = ..., hardest_batches: _Optional[int] = ...) -> None: ...

class ExactAggregate(_message.Message):
    __slots__ = ("weighted", "count", "ignored", "omitted", "sum_parts", "weighted_parts", "weight_parts")
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    SUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_PARTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PARTS_FIELD_NUMBER: _ClassVar[int]
    weighted: bool
    count: int
    ignored: int
    omitted: int
    sum_parts: _containers.RepeatedScalarFieldContainer[float]
    weighted_parts: _containers.RepeatedScalarFieldContainer[float]
    weight_parts: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, weighted: _Optional[bool] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., omitted: _Optional[int] = ..., sum_parts: _Optional[_Iterable[float]] = ..., weighted_parts: _Optional[_Iterable[float]] = ..., weight_parts: _Optional[_Iterable[float]] = ...) -> None: ...

class GroupedSumsState(_message.Message):
    __slots__ = ("keys", "sums", "counts", "nonfinite_groups", "nonfinite_flags")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[int]
    sums: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    nonfinite_groups: _containers.RepeatedScalarFieldContainer[int]
    nonfinite_flags: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[int]] = ..., sums: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., nonfinite_groups: _Optional[_Iterable[int]] = ..., nonfinite_flags: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassState(_message.Message):
    __slots__ = ("classes", "count", "sums", "weighted", "weights", "has_hits", "hits", "top_k_hits")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    HAS_HITS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_HITS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    sums: GroupedSumsState
    weighted: GroupedSumsState
    weights: GroupedSumsState
    has_hits: bool
    hits: _containers.RepeatedScalarFieldContainer[int]
    top_k_hits: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, classes: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ..., sums: _Optional[_Union[GroupedSumsState, _Mapping]] = ..., weighted: _Optional[_Union[GroupedSumsState, _Mapping]] = ..., weights: _Optional[_Union[GroupedSumsState, _Mapping]] = ..., has_hits: _Optional[bool] = ..., hits: _Optional[_Iterable[int]] = ..., top_k_hits: _Optional[_Iterable[int]] = ...) -> None: ...

class AccuracyState(_message.Message):
    __slots__ = ("count", "hits", "top_k_hits")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_HITS_FIELD_NUMBER: _ClassVar[int]
    count: int
    hits: int
    top_k_hits: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, count: _Optional[int] = ..., hits: _Optional[int] = ..., top_k_hits: _Optional[_Iterable[int]] = ...) -> None: ...

class CalibrationState(_message.Message):
    __slots__ = ("count", "hits", "confidence_sums")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_SUMS_FIELD_NUMBER: _ClassVar[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    hits: _containers.RepeatedScalarFieldContainer[int]
    confidence_sums: GroupedSumsState
    def __init__(self, count: _Optional[_Iterable[int]] = ..., hits: _Optional[_Iterable[int]] = ..., confidence_sums: _Optional[_Union[GroupedSumsState, _Mapping]] = ...) -> None: ...

class HardestState(_message.Message):
    __slots__ = ("k", "index", "loss", "has_target", "target", "has_predicted", "predicted", "has_confidence", "confidence", "has_sample_id", "sample_id")
    K_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HAS_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    HAS_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    HAS_SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    k: int
    index: _containers.RepeatedScalarFieldContainer[int]
    loss: _containers.RepeatedScalarFieldContainer[float]
    has_target: bool
    target: _containers.RepeatedScalarFieldContainer[int]
    has_predicted: bool
    predicted: _containers.RepeatedScalarFieldContainer[int]
    has_confidence: bool
    confidence: _containers.RepeatedScalarFieldContainer[float]
    has_sample_id: bool
    sample_id: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, k: _Optional[int] = ..., index: _Optional[_Iterable[int]] = ..., loss: _Optional[_Iterable[float]] = ..., has_target: _Optional[bool] = ..., target: _Optional[_Iterable[int]] = ..., has_predicted: _Optional[bool] = ..., predicted: _Optional[_Iterable[int]] = ..., has_confidence: _Optional[bool] = ..., confidence: _Optional[_Iterable[float]] = ..., has_sample_id: _Optional[bool] = ..., sample_id: _Optional[_Iterable[int]] = ...) -> None: ...

class SketchState(_message.Message):
    __slots__ = ("keys", "counts", "nan_count", "min", "max", "collapsed")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    COLLAPSED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    nan_count: int
    min: float
    max: float
    collapsed: bool
    def __init__(self, keys: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., nan_count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., collapsed: _Optional[bool] = ...) -> None: ...

class HardestBatchesState(_message.Message):
    __slots__ = ("k", "batch_id", "id_given", "ordinal", "start", "samples", "count", "mean")
    K_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ID_GIVEN_FIELD_NUMBER: _ClassVar[int]
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    k: int
    batch_id: _containers.RepeatedScalarFieldContainer[int]
    id_given: _containers.RepeatedScalarFieldContainer[bool]
    ordinal: _containers.RepeatedScalarFieldContainer[int]
    start: _containers.RepeatedScalarFieldContainer[int]
    samples: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, k: _Optional[int] = ..., batch_id: _Optional[_Iterable[int]] = ..., id_given: _Optional[_Iterable[bool]] = ..., ordinal: _Optional[_Iterable[int]] = ..., start: _Optional[_Iterable[int]] = ..., samples: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ...) -> None: ...

class SavedResult(_message.Message):
    __slots__ = ("format", "lossd_version", "state", "class_names")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LOSSD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    format: int
    lossd_version: str
    state: MergeState
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, format: _Optional[int] = ..., lossd_version: _Optional[str] = ..., state: _Optional[_Union[MergeState, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("per_class", "accuracy", "calibration", "hardest", "quantiles", "hardest_batches")
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    HARDEST_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    HARDEST_BATCHES_FIELD_NUMBER: _ClassVar[int]
    per_class: PerClass
    accuracy: Accuracy
    calibration: Calibration
    hardest: HardestSamples
    quantiles: Quantiles
    hardest_batches: HardestBatches
    def __init__(self, per_class: _Optional[_Union[PerClass, _Mapping]] = ..., accuracy: _Optional[_Union[Accuracy, _Mapping]] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., hardest: _Optional[_Union[HardestSamples, _Mapping]] = ..., quantiles: _Optional[_Union[Quantiles, _Mapping]] = ..., hardest_batches: _Optional[_Union[HardestBatches, _Mapping]] = ...) -> None: ...

class PerClass(_message.Message):
    __slots__ = ("classes", "count", "sum", "mean", "weighted_sum", "weighted_mean", "weight_sum", "correct", "accuracy", "top_k_correct", "top_k_accuracy")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_SUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_MEAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_CORRECT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    sum: _containers.RepeatedScalarFieldContainer[float]
    mean: _containers.RepeatedScalarFieldContainer[float]
    weighted_sum: _containers.RepeatedScalarFieldContainer[float]
    weighted_mean: _containers.RepeatedScalarFieldContainer[float]
    weight_sum: _containers.RepeatedScalarFieldContainer[float]
    correct: _containers.RepeatedScalarFieldContainer[int]
    accuracy: _containers.RepeatedScalarFieldContainer[float]
    top_k_correct: _containers.RepeatedScalarFieldContainer[int]
    top_k_accuracy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, classes: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ..., sum: _Optional[_Iterable[float]] = ..., mean: _Optional[_Iterable[float]] = ..., weighted_sum: _Optional[_Iterable[float]] = ..., weighted_mean: _Optional[_Iterable[float]] = ..., weight_sum: _Optional[_Iterable[float]] = ..., correct: _Optional[_Iterable[int]] = ..., accuracy: _Optional[_Iterable[float]] = ..., top_k_correct: _Optional[_Iterable[int]] = ..., top_k_accuracy: _Optional[_Iterable[float]] = ...) -> None: ...

class Accuracy(_message.Message):
    __slots__ = ("count", "correct", "accuracy", "top_k", "top_k_correct", "top_k_accuracy")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_K_CORRECT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    count: int
    correct: int
    accuracy: float
    top_k: _containers.RepeatedScalarFieldContainer[int]
    top_k_correct: _containers.RepeatedScalarFieldContainer[int]
    top_k_accuracy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, count: _Optional[int] = ..., correct: _Optional[int] = ..., accuracy: _Optional[float] = ..., top_k: _Optional[_Iterable[int]] = ..., top_k_correct: _Optional[_Iterable[int]] = ..., top_k_accuracy: _Optional[_Iterable[float]] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("edges", "count", "correct", "confidence_sum", "ece")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_SUM_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedScalarFieldContainer[float]
    count: _containers.RepeatedScalarFieldContainer[int]
    correct: _containers.RepeatedScalarFieldContainer[int]
    confidence_sum: _containers.RepeatedScalarFieldContainer[float]
    ece: float
    def __init__(self, edges: _Optional[_Iterable[float]] = ..., count: _Optional[_Iterable[int]] = ..., correct: _Optional[_Iterable[int]] = ..., confidence_sum: _Optional[_Iterable[float]] = ..., ece: _Optional[float] = ...) -> None: ...

class HardestSamples(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[HardSample]
    def __init__(self, samples: _Optional[_Iterable[_Union[HardSample, _Mapping]]] = ...) -> None: ...

class HardSample(_message.Message):
    __slots__ = ("index", "loss", "target", "predicted", "confidence", "sample_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    loss: float
    target: int
    predicted: int
    confidence: float
    sample_id: int
    def __init__(self, index: _Optional[int] = ..., loss: _Optional[float] = ..., target: _Optional[int] = ..., predicted: _Optional[int] = ..., confidence: _Optional[float] = ..., sample_id: _Optional[int] = ...) -> None: ...

class HardestBatches(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[HardBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[HardBatch, _Mapping]]] = ...) -> None: ...

class HardBatch(_message.Message):
    __slots__ = ("batch_id", "ordinal", "count", "mean", "in_hardest")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    IN_HARDEST_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    ordinal: int
    count: int
    mean: float
    in_hardest: int
    def __init__(self, batch_id: _Optional[int] = ..., ordinal: _Optional[int] = ..., count: _Optional[int] = ..., mean: _Optional[float] = ..., in_hardest: _Optional[int] = ...) -> None: ...

class Quantiles(_message.Message):
    __slots__ = ("levels", "values", "count", "min", "max", "nan_count", "relative_accuracy", "collapsed")
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COLLAPSED_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedScalarFieldContainer[float]
    values: _containers.RepeatedScalarFieldContainer[float]
    count: int
    min: float
    max: float
    nan_count: int
    relative_accuracy: float
    collapsed: bool
    def __init__(self, levels: _Optional[_Iterable[float]] = ..., values: _Optional[_Iterable[float]] = ..., count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., nan_count: _Optional[int] = ..., relative_accuracy: _Optional[float] = ..., collapsed: _Optional[bool] = ...) -> None: ...

class Diagnostics(_message.Message):
    __slots__ = ("predicted", "confidence", "correct")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    predicted: Tensor
    confidence: Tensor
    correct: bytes
    def __init__(self, predicted: _Optional[_Union[Tensor, _Mapping]] = ..., confidence: _Optional[_Union[Tensor, _Mapping]] = ..., correct: _Optional[bytes] = ...) -> None: ...

class SharedMemoryRequest(_message.Message):
    __slots__ = ("register", "unregister", "evaluate", "timeout_seconds")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    UNREGISTER_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    register: RegisterRegion
    unregister: str
    evaluate: EvaluateRequest
    timeout_seconds: float
    def __init__(self, register: _Optional[_Union[RegisterRegion, _Mapping]] = ..., unregister: _Optional[str] = ..., evaluate: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class RegisterRegion(_message.Message):
    __slots__ = ("name", "key", "byte_size", "descriptor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    byte_size: int
    descriptor: str
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ..., descriptor: _Optional[str] = ...) -> None: ...

class SharedMemoryResponse(_message.Message):
    __slots__ = ("session", "regions", "error", "descriptor_socket", "evaluation", "code", "retry_after_ms")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_SOCKET_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    session: str
    regions: _containers.RepeatedScalarFieldContainer[str]
    error: str
    descriptor_socket: str
    evaluation: EvaluateResponse
    code: int
    retry_after_ms: int
    def __init__(self, session: _Optional[str] = ..., regions: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., descriptor_socket: _Optional[str] = ..., evaluation: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., code: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OptionSpec(_message.Message):
    __slots__ = ("name", "type", "default", "description", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: str
    description: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[str] = ..., description: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class LossSpec(_message.Message):
    __slots__ = ("name", "description", "options", "prediction_shapes", "target_shapes", "prediction_dtypes", "target_dtypes", "inputs", "targets", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SHAPES_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHAPES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_DTYPES_FIELD_NUMBER: _ClassVar[int]
    TARGET_DTYPES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    options: _containers.RepeatedCompositeFieldContainer[OptionSpec]
    prediction_shapes: _containers.RepeatedScalarFieldContainer[str]
    target_shapes: _containers.RepeatedScalarFieldContainer[str]
    prediction_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    target_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    targets: str
    source: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., options: _Optional[_Iterable[_Union[OptionSpec, _Mapping]]] = ..., prediction_shapes: _Optional[_Iterable[str]] = ..., target_shapes: _Optional[_Iterable[str]] = ..., prediction_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., target_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., targets: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "description", "shapes", "dtypes", "optional")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    shapes: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    optional: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., shapes: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., optional: _Optional[bool] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses", "max_message_bytes")
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossSpec]
    max_message_bytes: int
    def __init__(self, losses: _Optional[_Iterable[_Union[LossSpec, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
