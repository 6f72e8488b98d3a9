"""Hugging Face transformers integration: patch a decoder in place, HydraModel (streams + heads),
checkpoints in safetensors, merged model directories, PEFT LoRA interop.

transformers is imported lazily, inside the functions that need it.
"""
from hydra_kernels.integrations.checkpoint import merge_adapter_into_base, merged_state_dict, save_merged
from hydra_kernels.integrations.hydra_model import HydraModel, check_plain_logits, last_token_index
from hydra_kernels.integrations.loading import base_directory, check_tokenizer_fits, load_causal_lm
from hydra_kernels.integrations.patch import (SUPPORTED_MODEL_TYPES, PatchInfo, cache_kwarg, check_token_ids,
                                              decoder_forward,
                                              disable_dropout, output_cache,
                                              hydra_modules,
                                              merged_adapters, patch_info, patch_model,
                                              position_ids_from_attention_mask, repeat_for_streams, unpatch_model)
from hydra_kernels.integrations.peft_lora import export_peft, import_peft

__all__ = ["patch_model", "unpatch_model", "PatchInfo", "patch_info", "hydra_modules", "merged_adapters",
           "SUPPORTED_MODEL_TYPES", "repeat_for_streams", "decoder_forward", "cache_kwarg", "output_cache", "position_ids_from_attention_mask", "disable_dropout",
           "HydraModel", "last_token_index", "check_plain_logits", "merge_adapter_into_base", "merged_state_dict", "save_merged",
           "export_peft", "import_peft", "load_causal_lm", "check_tokenizer_fits", "base_directory",
           "check_token_ids"]
