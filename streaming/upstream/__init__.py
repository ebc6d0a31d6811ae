"""The upstream: the openai SDK client, its network backend and the fast body path."""
