"""The gateway: OpenAI-compatible HTTP API, generation loop, and the swarm's registry."""
