"""Tool-call parsers: a model's raw output to OpenAI ``tool_calls`` and the content around them.

Chosen by name with ``--tool-call-parser`` (vLLM's names). Each parser reads one model family's format,
batch (`ToolParser.extract`) or streaming (`ToolParser.stream`), with the same result for any split of
the same text; see `base` for the rules they share.
"""

from __future__ import annotations

from .._registry import instantiate
from .base import ContentDelta as ContentDelta
from .base import ExtractedToolCalls as ExtractedToolCalls
from .base import ToolCall as ToolCall
from .base import ToolCallDelta as ToolCallDelta
from .base import ToolCallStream as ToolCallStream
from .base import ToolParser as ToolParser
from .base import ToolStreamEvent as ToolStreamEvent
from .base import new_call_id as new_call_id
from .deepseek_v3 import DeepSeekV3ToolParser
from .glm45 import Glm45ToolParser
from .hermes import HermesToolParser
from .kimi_k2 import KimiK2ToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .openai import OpenAIToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "glm45": Glm45ToolParser,
    "kimi_k2": KimiK2ToolParser,
    "openai": OpenAIToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; an unknown name is an `InvalidConfig` listing the choices."""
    return instantiate(TOOL_PARSERS, name, what="tool-call parser", option="tool_call_parser")
