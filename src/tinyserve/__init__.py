"""tinyserve: a fast, hackable LLM inference engine and serving lab."""

from tinyserve.config import EngineConfig
from tinyserve.llm import LLM
from tinyserve.outputs import CompletionOutput, RequestOutput
from tinyserve.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "__version__"]
