"""The OpenAI-compatible HTTP server (`moral serve`): it answers with the champion adapter (or a named
version, or the base model) and depends only on `moe/` and `storage/`."""
