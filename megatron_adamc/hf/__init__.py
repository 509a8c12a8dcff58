"""Hugging Face, both ways: DeepSpeed checkpoints -> ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM`` for QK-norm)
directories, and local HF Llama directories -> project weights that ``checkpoint.init_from`` continues from.

Nothing here needs transformers or huggingface_hub; transformers, when installed, only adds ``tokenizer.json``.
"""

from megatron_adamc.hf.consolidate import consolidate_fp32
from megatron_adamc.hf.export import Exported, export_hf
from megatron_adamc.hf.import_hf import Imported, import_hf
from megatron_adamc.hf.mapping import LLAMA, QWEN3, from_hf, hf_architecture, to_hf

__all__ = [
    "LLAMA",
    "QWEN3",
    "Exported",
    "Imported",
    "consolidate_fp32",
    "export_hf",
    "from_hf",
    "hf_architecture",
    "import_hf",
    "to_hf",
]
