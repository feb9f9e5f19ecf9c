"""What the gateway and the blockservers must agree on: protocol, records, balancing, model adapters."""
