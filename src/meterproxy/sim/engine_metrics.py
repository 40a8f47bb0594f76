"""vLLM's own token and request counters, as the simulated vLLM serves them at /metrics.

Names, help texts and label names are vLLM's (vllm/v1/metrics/loggers.py,
`PrometheusStatLogger`: counters `vllm:prompt_tokens`, `vllm:generation_tokens`,
`vllm:request_success` on labels `model_name`, `engine`, plus `finished_reason` for the last,
every reason pre-created at zero); the text is what prometheus_client renders for them (a
`_total` sample and a `_created` gauge per child, labels sorted). What is counted follows
vllm/v1/metrics/stats.py: a request's prompt when its first token is generated, each generated
token, and the finish reason once it ends. With `n` > 1 vLLM runs one engine request per choice
(vllm/v1/engine/parallel_sampling.py, `ParentRequest`), so the prompt and the finish are counted
once per choice, while the API's usage reports the prompt once: that gap is real vLLM behaviour.
Only these three families are served; a real vLLM serves many more.

trtllm-serve (TensorRT-LLM >= 1.1) counts the same three things under its own names
(tensorrt_llm/metrics/collector.py, `MetricsCollector`, adapted from vLLM's:
`trtllm_prompt_tokens`, `trtllm_generation_tokens`, `trtllm_request_success` with a
`finished_reason` label, on the labels its server gives it: `model_name`, `engine_type`) and
serves them at /prometheus/metrics; `TRTLLM` renders that dialect.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

# vllm/v1/engine/__init__.py: FINISH_REASON_STRINGS, in FinishReason order.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
ENGINE = "0"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Dialect:
    families: tuple[tuple[str, str], tuple[str, str], tuple[str, str]]  # prompt, generated, done
    labels: tuple[tuple[str, str], ...]  # the constant labels every sample carries


VLLM = Dialect(
    (
        ("vllm:prompt_tokens", "Number of prefill tokens processed."),
        ("vllm:generation_tokens", "Number of generation tokens processed."),
        ("vllm:request_success", "Count of successfully processed requests."),
    ),
    (("engine", ENGINE),),
)
TRTLLM = Dialect(
    (
        ("trtllm_prompt_tokens", "Cumulative number of prompt (input) tokens processed."),
        ("trtllm_generation_tokens", "Cumulative number of generation (output) tokens produced."),
        ("trtllm_request_success", "Count of successfully processed requests."),
    ),
    (("engine_type", "trtllm"),),
)


@dataclass
class VllmCounters:
    created_s: float = field(default_factory=time.time)
    prompt: dict[str, int] = field(default_factory=dict)
    generation: dict[str, int] = field(default_factory=dict)
    success: dict[tuple[str, str], int] = field(default_factory=dict)

    def serve(self, model: str) -> None:
        """Create the model's counters at zero, as vLLM does for its served model at startup."""
        self.prompt.setdefault(model, 0)
        self.generation.setdefault(model, 0)
        for reason in FINISH_REASONS:
            self.success.setdefault((model, reason), 0)

    def prefilled(self, model: str, prompt_tokens: int) -> None:
        self.serve(model)
        self.prompt[model] += prompt_tokens

    def generated(self, model: str, tokens: int = 1) -> None:
        self.serve(model)
        self.generation[model] += tokens

    def finished(self, model: str, reason: str, choices: int = 1) -> None:
        self.serve(model)
        self.success[(model, reason)] += choices

    def render(self, dialect: Dialect = VLLM) -> str:
        lines: list[str] = []
        series: list[list[tuple[dict[str, str], int]]] = [
            [({"model_name": m}, v) for m, v in self.prompt.items()],
            [({"model_name": m}, v) for m, v in self.generation.items()],
            [({"model_name": m, "finished_reason": r}, v) for (m, r), v in self.success.items()],
        ]
        constant = dict(dialect.labels)
        for (name, help_text), samples in zip(dialect.families, series, strict=True):
            lines += [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter"]
            lines += [
                f"{name}_total{_labels({**labels, **constant})} {_go_float(v)}"
                for labels, v in samples
            ]
            lines += [f"# HELP {name}_created {help_text}", f"# TYPE {name}_created gauge"]
            created = _go_float(self.created_s)
            lines += [
                f"{name}_created{_labels({**labels, **constant})} {created}"
                for labels, _ in samples
            ]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    pairs = sorted(labels.items())
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _go_float(value: float) -> str:
    """prometheus_client's floatToGoString: Python's repr, but Go's exponent form past 1e6."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s
