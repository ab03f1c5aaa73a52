"""What the test suite and the benchmarks share: model configurations and directories, free ports, real servers.

The top of the house: it may import any layer, and nothing in the package imports it. Importing it loads
no torch (the helpers that need torch or transformers import them when called).
"""

from __future__ import annotations

from atom_trio._net import free_port as free_port
from atom_trio.testing.eagle import greedy_window_drafts as greedy_window_drafts
from atom_trio.testing.eagle import write_echo_target as write_echo_target
from atom_trio.testing.eagle import write_tiny_eagle3_head as write_tiny_eagle3_head
from atom_trio.testing.eagle import write_tiny_eagle_head as write_tiny_eagle_head
from atom_trio.testing.eagle import write_tiny_mtp_target as write_tiny_mtp_target
from atom_trio.testing.kimi import KIMI_K2_STRUCTURE as KIMI_K2_STRUCTURE
from atom_trio.testing.kimi import write_kimi_tokenizer as write_kimi_tokenizer
from atom_trio.testing.kimi import write_tiny_kimi_k2 as write_tiny_kimi_k2
from atom_trio.testing.models import GLM_4_5_AIR as GLM_4_5_AIR
from atom_trio.testing.models import GPT_OSS_20B as GPT_OSS_20B
from atom_trio.testing.models import LLAMA_3_1_8B as LLAMA_3_1_8B
from atom_trio.testing.models import MIXTRAL_8X7B as MIXTRAL_8X7B
from atom_trio.testing.models import QWEN3_0_6B as QWEN3_0_6B
from atom_trio.testing.models import QWEN3_30B_A3B as QWEN3_30B_A3B
from atom_trio.testing.models import REAL_CONFIGS as REAL_CONFIGS
from atom_trio.testing.models import ROUTER_GAIN as ROUTER_GAIN
from atom_trio.testing.models import TINY_CONFIGS as TINY_CONFIGS
from atom_trio.testing.models import TINY_GPT_OSS_MXFP4 as TINY_GPT_OSS_MXFP4
from atom_trio.testing.models import TINY_MLA_CONFIGS as TINY_MLA_CONFIGS
from atom_trio.testing.models import TINY_MOE_CONFIGS as TINY_MOE_CONFIGS
from atom_trio.testing.models import add_model_shapes_arguments as add_model_shapes_arguments
from atom_trio.testing.models import model_shapes as model_shapes
from atom_trio.testing.models import sharpen_routers as sharpen_routers
from atom_trio.testing.models import transformers_config as transformers_config
from atom_trio.testing.models import transformers_greedy as transformers_greedy
from atom_trio.testing.models import write_model_dir as write_model_dir
from atom_trio.testing.models import write_tiny_model_dir as write_tiny_model_dir
from atom_trio.testing.servers import ServerProcess as ServerProcess
from atom_trio.testing.servers import server_process as server_process
