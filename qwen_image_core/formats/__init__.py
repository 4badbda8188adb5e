"""All checkpoint-format knowledge, as data: prefixes, rename tables, markers and detection rules.

One module per component (`dit`, `vae`, `qwen_vl`, `lora`; `dit21` for the Qwen-Image-2.1 DiT); `common` holds
what they share (prefix stripping, float8 scale spellings, key-set checks with clear errors).
"""
