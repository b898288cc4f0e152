"""Hugging Face checkpoints in and out: safetensors weights, config.json and tokenizer.json of GPT-2, Llama-family,
Mistral and Qwen2 models as `attn.models.DecoderLM` models, of BERT encoders (MiniLM) as `attn.models.Encoder`,
and of ViTModel image encoders as `attn.models.ViT`.

    from attn import pretrained
    model, params, tokenizer, hf_config = pretrained.load("path/to/model")        # optional dtype=, mesh=, shardings=
    pretrained.save("path/to/copy", model, params, hf_config, tokenizer=tokenizer)

Supported architectures: `pretrained.ARCHITECTURES` (BertModel, GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, ViTModel). See attn.pretrained.checkpoint for loading and saving,
attn.pretrained.gpt2 / llama / mistral / qwen2 / bert / vit for the config translation and the tensor layouts.
"""

from attn.pretrained.checkpoint import ARCHITECTURES, architecture_of, load, load_tokenizer, read_config, save

__all__ = ["ARCHITECTURES", "architecture_of", "load", "load_tokenizer", "read_config", "save"]
