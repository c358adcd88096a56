"""RSafe Proxy: an OpenAI-compatible gateway that screens prompts and answers with an RSafe guard model."""

__all__: list[str] = []
