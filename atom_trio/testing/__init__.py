"""What the test suite and the benchmarks share: model configurations and directories, free ports, real servers.

The top of the house: it may import any layer, and nothing in the package imports it. Importing it loads
no torch (the helpers that need torch or transformers import them when called).
"""

from __future__ import annotations

from atom_trio._net import free_port as free_port
from atom_trio.testing.models import LLAMA_3_1_8B as LLAMA_3_1_8B
from atom_trio.testing.models import QWEN3_0_6B as QWEN3_0_6B
from atom_trio.testing.models import TINY_CONFIGS as TINY_CONFIGS
from atom_trio.testing.models import transformers_config as transformers_config
from atom_trio.testing.models import write_model_dir as write_model_dir
from atom_trio.testing.models import write_tiny_model_dir as write_tiny_model_dir
from atom_trio.testing.servers import ServerProcess as ServerProcess
from atom_trio.testing.servers import server_process as server_process
