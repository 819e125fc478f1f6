"""Hugging Face <-> Megatron checkpoint conversion (``llada-cpt convert import|export``).

* :mod:`.mapping` - architectures, config mapping, tensor layouts (pure torch, no Megatron);
* :mod:`.safetensors_io` - streaming reads of HF checkpoints, size-bounded sharded writes;
* :mod:`.tokenizer_files` - tokenizer copy with the mask token added;
* :mod:`.hf_import` - HF -> our Megatron run directory (collective, any TP/PP/EP layout);
* :mod:`.hf_export` - our checkpoint -> HF directory loadable by ``transformers``.

Submodules are imported lazily so that ``llada-cpt convert --help`` stays cheap.
"""
from .errors import ConvertError, ConvertInputMissing

__all__ = ["ConvertError", "ConvertInputMissing"]
