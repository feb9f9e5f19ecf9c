"""The blockserver: serves one span of a model's layers to gateways over WebSocket sessions."""
